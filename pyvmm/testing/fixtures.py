"""The plugin's fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pyvmm.testing.linux import LinuxBoot, LinuxGuest, MakeLinux
from pyvmm.testing.options import linux_options, linux_scope, seconds
from pyvmm.testing.payloads import MakePayloadVm, Payloads, PayloadVms, RunPayload


# --- the fixtures --------------------------------------------------------------------------------
def _item(request: pytest.FixtureRequest) -> pytest.Item:
    node = request.node
    assert isinstance(node, pytest.Item), node  # the function-scoped fixtures below
    return node


@pytest.fixture(scope="session")
def pyvmm_payloads(pytestconfig: pytest.Config) -> Payloads:
    """Assemble `.S` payloads through the payload cache: pyvmm_payloads.build(path, conduit=,
    defsyms=, arch=) -> the binary's Path (its ELF file beside it). Needs no KVM."""
    return Payloads(pytestconfig)


@pytest.fixture
def run_payload(request: pytest.FixtureRequest) -> Iterator[RunPayload]:
    """run_payload(payload, services=, conduit=, cpus=, ...) -> PayloadRun, each on a fresh VM
    run to its end (closed after the test)."""
    vms = PayloadVms(_item(request))
    yield RunPayload(vms)
    vms.close()


@pytest.fixture
def payload_vm(request: pytest.FixtureRequest) -> Iterator[MakePayloadVm]:
    """payload_vm(payload, ...) -> PayloadRun on a fresh VM, loaded but not started: set the VM
    up through .vm, then .run() (closed after the test)."""
    vms = PayloadVms(_item(request))
    yield MakePayloadVm(vms)
    vms.close()


@pytest.fixture(scope=linux_scope)
def _pyvmm_linux_shared(pytestconfig: pytest.Config) -> Iterator[LinuxBoot]:
    boot = LinuxBoot(linux_options(pytestconfig), base=pytestconfig.rootpath,
                     boot_timeout=seconds(pytestconfig.getini("pyvmm_boot_timeout"), "ini option pyvmm_boot_timeout"))
    yield boot
    boot.close()


@pytest.fixture
def linux(_pyvmm_linux_shared: LinuxBoot, request: pytest.FixtureRequest) -> LinuxGuest:
    """A Linux guest on the host's root, shared by the module's tests (pyvmm_linux_scope), booted
    at the first command: linux.run(command) -> Completed(status, stdout, stderr)."""
    return LinuxGuest(_pyvmm_linux_shared, _item(request))


@pytest.fixture
def make_linux(request: pytest.FixtureRequest) -> Iterator[MakeLinux]:
    """make_linux(kernel=, cpus=, services=, configure=, ...) -> a LinuxGuest of this test's own."""
    maker = MakeLinux(_item(request))
    yield maker
    maker.close()

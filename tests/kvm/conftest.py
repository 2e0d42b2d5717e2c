"""The KVM tier: every test here runs on real arm64 KVM through the plugin's fixtures
(run_payload, payload_vm, linux, make_linux, pyvmm_payloads: pyvmm/testing/), with guests
written on pyvmm.inc, as a user's tests are. A few build pyvmm.vm.Vm themselves (a Linux guest
with devices attached, two VMs at once): those test the Python API that scripts use."""

from __future__ import annotations

from pathlib import Path

import pytest

SIP64 = 0xC200_0000
SIP32 = 0x8200_0000

HERE = Path(__file__).resolve().parent


def guest(name: str) -> str:
    """The source of test guest `name` (tests/guests/NAME.S), as the fixtures take it."""
    return f"tests/guests/{name}.S"


def needs_filter(what: str) -> pytest.MarkDecorator:
    """The mark of a test that does not apply to a host without the SMCCC filter (Linux < 6.4)."""
    return pytest.mark.host(smccc_filter=True, reason=f"{what}, which needs the SMCCC filter of Linux >= 6.4")


# the commonest reason: pyvmm's test guests report their values with an SMC64 call to a forwarded
# SiP function (FN_REPORT), and many tests answer calls with a handler of their own
NEEDS_FILTER = needs_filter("its guest reports, or it answers calls, through forwarded SMCCC calls")


# virtio-fs backs guest RAM with a memfd its daemon maps; KVM refuses that to an MTE guest before
# Linux 6.2, and pyvmm gives its guests MTE wherever the host has it. The SMCCC filter's shape
# field (Linux >= 6.4) marks the kernels that take it.
NEEDS_SHARED_RAM = pytest.mark.host(
    smccc_filter=True, reason="a vhost-user daemon (virtiofsd, qemu-storage-daemon) shares guest RAM, which KVM "
                              "refuses an MTE guest before Linux 6.2 (pyvmm says so in one line; --disable-mte, "
                              "or 9p and pyvmm's own disk, serve there)")


# the kernel's vhost-net moves the frames of a tap NIC where /dev/vhost-net opens; elsewhere pyvmm
# falls back to its own data plane (tests/unit/test_vhost_net.py)
NEEDS_VHOST_NET = pytest.mark.host(
    vhost_net=True, reason="it tests the kernel's vhost-net data plane, and /dev/vhost-net does not open here "
                           "(load vhost_net)")

# --vsock needs the kernel's vhost-vsock: without it pyvmm refuses the flag in one line
# (tests/unit/test_vsock.py)
NEEDS_VHOST_VSOCK = pytest.mark.host(
    vhost_vsock=True, reason="it tests virtio-vsock, which the kernel's vhost-vsock serves, and /dev/vhost-vsock "
                             "does not open here (load vhost_vsock)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/kvm/ is KVM tier (the hook sees the whole session's items)."""
    for item in items:
        if HERE in Path(item.fspath).resolve().parents:
            item.add_marker(pytest.mark.kvm)


def s64(value: int) -> int:
    """A 64-bit register value as a signed number (PSCI error codes)."""
    return value - (1 << 64) if value >> 63 else value


def s32(value: int) -> int:
    return value - (1 << 32) if value >> 31 else value

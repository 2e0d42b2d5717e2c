"""The plugin's options and markers, the KVM requirement (fail, or skip when asked, with one line) and each test's time limit."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest

from pyvmm.testing.options import ini_int, linux_scope, seconds

KVM_FIXTURES = frozenset({"run_payload", "payload_vm", "linux", "make_linux"})
SKIP_OPTION = "--pyvmm-skip-without-kvm"
NEEDS_KVM = "pyvmm: this test needs arm64 KVM: "
WANT_OF_KVM = "pyvmm_want_of_kvm"  # a report property: the test ended for want of KVM, and why


# --- options, markers, the KVM requirement ---------------------------------------------------
def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("pyvmm", "pyvmm guests on arm64 KVM")
    group.addoption(SKIP_OPTION, action="store_true", dest="pyvmm_skip_without_kvm",
                    help="skip, instead of failing, the tests that need arm64 KVM where there is none")
    parser.addini("pyvmm_timeout", "seconds each payload run and each Linux command may take (default 60)",
                  default="60")
    parser.addini("pyvmm_boot_timeout", "seconds a Linux guest may take to boot (default 180)", default="180")
    parser.addini("pyvmm_payload_cache", "directory of assembled payloads, relative to the ini file "
                  "(default: build/pyvmm-payloads under the rootdir; $PYVMM_PAYLOAD_CACHE overrides both)",
                  default="")
    parser.addini("pyvmm_include_dirs", "more directories .include looks in, relative to the ini file",
                  type="paths", default=[])
    parser.addini("pyvmm_linux_scope", "scope of the Linux guest the `linux` fixture shares (default module)",
                  default="module")
    parser.addini("pyvmm_linux_kernel", "kernel Image of `linux` guests (default: the running kernel's)", default="")
    parser.addini("pyvmm_linux_modules", "its /lib/modules/RELEASE (default: found from the kernel)", default="")
    parser.addini("pyvmm_linux_cpus", "vCPUs of `linux` guests (default 1)", default="1")
    parser.addini("pyvmm_linux_mem", "MiB of RAM of `linux` guests (default 512)", default="512")
    parser.addini("pyvmm_linux_params", "more kernel command line for `linux` guests", default="")
    parser.addini("pyvmm_linux_rwdirs", "host directories `linux` guests may write to, relative to the ini file",
                  type="paths", default=[])


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "pyvmm_kvm: the test needs arm64 KVM (fails without it, or is skipped "
                                       f"with {SKIP_OPTION})")
    config.addinivalue_line("markers", "pyvmm_timeout(seconds): the time limit of each guest run in the test")
    config.stash[_STATE] = _State()
    config.pluginmanager.register(KvmSummary(), "pyvmm-kvm-summary")
    # a mistyped ini option is said once, at start-up, not by each test that meets it
    for name in ("pyvmm_timeout", "pyvmm_boot_timeout"):
        seconds(config.getini(name), f"ini option {name}")
    for name in ("pyvmm_linux_cpus", "pyvmm_linux_mem"):
        ini_int(config, name)
    linux_scope("linux", config)


@dataclass
class _State:
    checked: bool = False
    problem: str | None = None  # why this host cannot run the tests that need KVM; None: it can


_STATE = pytest.StashKey[_State]()


def kvm_problem() -> str | None:
    """Why this host cannot run pyvmm's guests (one line), or None when it can: an arm64
    Linux whose /dev/kvm opens and makes VMs. (Without the SMCCC filter, Linux < 6.4, guests
    run with KVM's PSCI; what needs the filter fails on its own with a line saying so.)"""
    machine = os.uname().machine
    if machine != "aarch64":
        return f"this host is {machine}, not arm64 (aarch64)"
    try:
        from pyvmm.errors import VmmError
        from pyvmm.kvm.fds import Kvm
    except ImportError as e:
        return f"pyvmm's KVM bindings do not load: {e}"
    try:
        kvm = Kvm()
    except VmmError as e:
        return str(e)
    try:
        from kvm_bindings.constants import Cap
        from pyvmm.machine.host import probe_ipa_bits

        kvm.create_vm(probe_ipa_bits(kvm.check_extension(Cap.ARM_VM_IPA_SIZE))).close()
    except VmmError as e:
        return str(e)
    finally:
        kvm.close()
    return None


def _state(config: pytest.Config) -> _State:
    state = config.stash.get(_STATE, None)
    if state is None:  # a Config this plugin was not configured for (a nested run): start one
        state = config.stash[_STATE] = _State()
    return state


def require_kvm(item: pytest.Item) -> None:
    """Fail `item` (skip it, with --pyvmm-skip-without-kvm) unless this host has arm64 KVM."""
    state = _state(item.config)
    if not state.checked:
        state.problem, state.checked = kvm_problem(), True
    if state.problem is None:
        return
    message = NEEDS_KVM + " ".join(state.problem.split())  # one line, whatever the cause said
    # said on the test's report, which reaches the process that writes the summary: this one, or
    # pytest-xdist's controller when workers run the tests
    skipping = bool(item.config.getoption("pyvmm_skip_without_kvm", False))
    item.user_properties.append((WANT_OF_KVM, state.problem))
    if skipping:
        pytest.skip(message)
    pytest.fail(message, pytrace=False)


def needs_kvm(item: pytest.Item) -> bool:
    return item.get_closest_marker("pyvmm_kvm") is not None or not KVM_FIXTURES.isdisjoint(
        getattr(item, "fixturenames", ()))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> None:
    # Before the test body, and after fixture setup, which touches no KVM: the test is reported
    # as failed (or skipped), with the reason as its one line.
    if needs_kvm(item):
        require_kvm(item)


class KvmSummary:
    """How many tests ended for want of KVM, counted from their reports (see require_kvm): the
    process that writes the summary sees every report, pytest-xdist's controller included."""

    def __init__(self) -> None:
        self.problem: str | None = None  # why, as the last such test said
        self.skipped: set[str] = set()  # node IDs
        self.failed: set[str] = set()

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when != "call":
            return
        for name, problem in report.user_properties:
            if name == WANT_OF_KVM:
                self.problem = str(problem)
                (self.skipped if report.skipped else self.failed).add(report.nodeid)

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        state = self
        if state.problem is None:
            return
        if state.skipped:
            n = len(state.skipped)
            terminalreporter.write_line(f"pyvmm: {n} {'test' if n == 1 else 'tests'} skipped for want of arm64 KVM "
                                        f"({SKIP_OPTION}): {state.problem}")
        if state.failed:
            n = len(state.failed)
            terminalreporter.write_line(f"pyvmm: {n} {'test' if n == 1 else 'tests'} failed for want of arm64 KVM "
                                        f"({SKIP_OPTION} would skip {'it' if n == 1 else 'them'}): {state.problem}")

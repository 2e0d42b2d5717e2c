"""pyvmm's pytest plugin: fixtures that run guests on arm64 KVM for firmware-interface tests.

Installed with pyvmm (entry point `pytest11`: `pyvmm`), or loaded with `-p pyvmm.pytest_plugin`.

Fixtures:
  run_payload     run a guest payload (a `.S` source, assembled for you, or a flat binary) on a
                  fresh VM with the SMCCC services, conduit and vCPU count you choose; returns a
                  PayloadRun: the exit (RunResult), what the guest reported, the SMCCC trace
  linux           a Linux guest on the host's root, booted once per module (pyvmm_linux_scope)
                  and shared; linux.run(command) -> Completed(status, stdout, stderr)
  make_linux      a Linux guest of your own (kernel, vCPUs, services, ...), closed after the test
  pyvmm_payloads  the payload cache: assemble a `.S` file without running it (no KVM needed)

A test that uses run_payload, linux or make_linux (or is marked pyvmm_kvm) needs arm64 KVM
(and, for services, reports and the trace, its SMCCC filter: Linux >= 6.4). Where there is
none it FAILS, with one line saying why; with --pyvmm-skip-without-kvm it is skipped instead,
and the summary says how many were.

Every guest run has a time limit: pyvmm_timeout seconds (ini, default 60) for each payload run
and each command, pyvmm_boot_timeout (default 180) for a Linux boot; @pytest.mark.pyvmm_timeout(S)
sets a test's, and each call takes timeout=.

Guests report values by the convention of pyvmm's own test guests: an SMC64 call FN_REPORT
(0xC20000F0) with x1..x6, x1 a tag; `.include "pyvmm.inc"` (pyvmm/testing/include/) has the macros.

This module imports nothing of pyvmm's machinery and touches no KVM until a fixture is used:
loading it must never break a pytest run, on any host.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import pytest

if TYPE_CHECKING:
    from pyvmm.exec.session import Completed, LinuxSession
    from pyvmm.machine.lifecycle import RunResult
    from pyvmm.machine.vm import Vm
    from pyvmm.services.modules import ServiceModule
    from pyvmm.smccc.context import ServiceContext, TraceEvent
    from pyvmm.smccc.dispatcher import Dispatcher, TraceRecord
    from pyvmm.smccc.service import Service
    from pyvmm.testing.payload import PayloadCache

    # A service for a guest: a service module file (RANGE, handle, NAME: what `pyvmm run
    # --service` loads), a loaded ServiceModule, a Service, or a callable that makes one from
    # the VM's ServiceContext (a Service class such as pyvmm.services.sdei.Sdei is one).
    ServiceSpec = str | os.PathLike[str] | ServiceModule | Service | Callable[[ServiceContext], Service]

FN_REPORT = 0xC200_00F0  # pyvmm.inc's FN_REPORT: x1..x6 are the guest's report
REPORT_ARGS = ("x1", "x2", "x3", "x4", "x5", "x6")
KVM_FIXTURES = frozenset({"run_payload", "linux", "make_linux"})
SKIP_OPTION = "--pyvmm-skip-without-kvm"
NEEDS_KVM = "pyvmm: this test needs arm64 KVM: "
REPORT_SECTION_LINES = 200  # of a run's trace, shown with a failing test
SCOPES = ("function", "class", "module", "package", "session")
Scope = Literal["function", "class", "module", "package", "session"]


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
    # a mistyped ini option is said once, at start-up, not by each test that meets it
    for name in ("pyvmm_timeout", "pyvmm_boot_timeout"):
        _seconds(config.getini(name), f"ini option {name}")
    for name in ("pyvmm_linux_cpus", "pyvmm_linux_mem"):
        _ini_int(config, name)
    _linux_scope("linux", config)


@dataclass
class _State:
    checked: bool = False
    problem: str | None = None  # why this host cannot run the tests that need KVM; None: it can
    skipped: set[str] = field(default_factory=set)  # node IDs
    failed: set[str] = field(default_factory=set)


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
    if item.config.getoption("pyvmm_skip_without_kvm", False):
        state.skipped.add(item.nodeid)
        pytest.skip(message)
    state.failed.add(item.nodeid)
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


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int,
                            config: pytest.Config) -> None:
    state = config.stash.get(_STATE, None)
    if state is None or state.problem is None:
        return
    if state.skipped:
        n = len(state.skipped)
        terminalreporter.write_line(f"pyvmm: {n} {'test' if n == 1 else 'tests'} skipped for want of arm64 KVM "
                                    f"({SKIP_OPTION}): {state.problem}")
    if state.failed:
        n = len(state.failed)
        terminalreporter.write_line(f"pyvmm: {n} {'test' if n == 1 else 'tests'} failed for want of arm64 KVM "
                                    f"({SKIP_OPTION} would skip {'it' if n == 1 else 'them'}): {state.problem}")


# --- time limits and paths -------------------------------------------------------------------
def _seconds(value: object, what: str) -> float:
    try:
        seconds = float(cast(Any, value))
    except (TypeError, ValueError):
        seconds = math.nan
    if not (seconds > 0 and math.isfinite(seconds)):
        raise pytest.UsageError(f"pyvmm: {what} must be a number of seconds above 0, not {value!r}")
    return seconds


def time_limit(item: pytest.Item) -> float:
    """The time limit of each guest run in `item`: its pyvmm_timeout marker, else the ini's."""
    marker = item.get_closest_marker("pyvmm_timeout")
    if marker is not None:
        value = marker.args[0] if marker.args else marker.kwargs.get("seconds")
        return _seconds(value, "@pytest.mark.pyvmm_timeout(seconds)")
    return _seconds(item.config.getini("pyvmm_timeout"), "ini option pyvmm_timeout")


def _ini_base(config: pytest.Config) -> Path:
    return config.inipath.parent if config.inipath is not None else config.rootpath


def _in_project(config: pytest.Config, path: str | os.PathLike[str]) -> Path:
    """A path a test names: as given when absolute, else under pytest's rootdir."""
    p = Path(path)
    return p if p.is_absolute() else config.rootpath / p


def payload_cache(config: pytest.Config) -> PayloadCache:
    from pyvmm.testing.payload import CACHE_ENV, PayloadCache

    env = os.environ.get(CACHE_ENV)
    ini = str(config.getini("pyvmm_payload_cache")).strip()
    if env:
        directory = Path(env).resolve()
    elif ini:
        directory = _ini_base(config) / ini
    else:
        directory = config.rootpath / "build" / "pyvmm-payloads"
    return PayloadCache(directory, cast(list[Path], config.getini("pyvmm_include_dirs")))


class Payloads:
    """The `pyvmm_payloads` fixture: `.S` sources assembled through the payload cache."""

    def __init__(self, config: pytest.Config) -> None:
        self._config = config
        self.cache = payload_cache(config)

    def build(self, source: str | os.PathLike[str], *, conduit: str = "hvc",
              defsyms: Mapping[str, int] | None = None) -> Path:
        """The flat binary of `source` (relative: to the rootdir) whose firmware calls use `conduit`.
        A source that cannot be assembled fails the test with the reason (the assembler's
        messages, or the command that pre-builds it where binutils are)."""
        from pyvmm.testing.payload import PayloadError

        try:
            path, _ = self.cache.build(_in_project(self._config, source), conduit=conduit, defsyms=defsyms)
        except PayloadError as e:
            pytest.fail(f"pyvmm: {e}", pytrace=False)
        return path


# --- services and the SMCCC trace ------------------------------------------------------------
def add_services(smccc: Dispatcher, context: ServiceContext, services: Iterable[ServiceSpec], base: Path) -> None:
    """Register each of `services` (see ServiceSpec) with a VM's dispatcher; module files are
    relative to `base`. A handler-only service is traced with its first six arguments, x1..x6,
    since it names none."""
    from pyvmm.errors import VmmError
    from pyvmm.services.modules import ServiceModule, load_service_module
    from pyvmm.smccc.service import Service

    for spec in services:
        if isinstance(spec, str | os.PathLike):
            path = Path(spec)
            spec = load_service_module(str(path if path.is_absolute() else base / path))
        if isinstance(spec, ServiceModule):
            smccc.add_service(_handler_service(spec))
        elif isinstance(spec, Service):
            smccc.add_service(spec)
        elif callable(spec):
            made = spec(context)
            if not isinstance(made, Service):
                raise VmmError(f"service factory {spec!r} returned {made!r}, not a pyvmm Service")
            smccc.add_service(made)
        else:
            raise VmmError(f"{spec!r} is not a service: give a service module's path, a ServiceModule, a Service, "
                           "or a callable that makes a Service from the VM's ServiceContext")


def _handler_service(module: ServiceModule) -> Service:
    from pyvmm.smccc.service import Function, HandlerService

    class ArgsTraced(HandlerService):
        def lookup(self, fid: int) -> Function | None:
            fn = super().lookup(fid)
            return None if fn is None else fn._replace(args=REPORT_ARGS)

    return ArgsTraced(module.base, module.size, module.handle, module.name)


@dataclass(frozen=True)
class Report:
    """One FN_REPORT call: the vCPU that made it and its x1..x6."""

    vcpu: int
    values: tuple[int, ...]

    @property
    def tag(self) -> int:
        return self.values[0]


def report_service(reports: list[Report]) -> Service:
    """The service answering FN_REPORT: each call's x1..x6 appended to `reports`, x0 = 0."""
    from pyvmm.smccc.call import SmcccCall
    from pyvmm.smccc.service import Function, Results, Service

    lock = threading.Lock()  # vCPU threads report concurrently

    class ReportService(Service):
        name = "pyvmm test reports"
        ranges = ((FN_REPORT, 1),)

        def functions(self) -> dict[int, Function]:
            return {FN_REPORT: Function("REPORT", self.report, REPORT_ARGS)}

        def report(self, call: SmcccCall) -> Results:
            values = call.args(6)
            with lock:
                reports.append(Report(call.vcpu.index, values))
            return 0

    return ReportService()


@dataclass(frozen=True)
class TracedCall:
    """One forwarded SMCCC call as the dispatcher answered it."""

    seq: int  # its place among the trace's calls and events
    vcpu: int
    conduit: str  # the conduit the guest used: "hvc" or "smc"
    function_id: int
    name: str  # the function's name; for an ID no service implements, the ID in hex
    implemented: bool  # False: no service has the ID (the guest got NOT_SUPPORTED)
    arg_names: tuple[str, ...]
    args: tuple[int, ...]  # as the guest passed them (32 bits for an SMC32 call)
    results: tuple[int, ...] | None  # x0.. as the guest got them; None: the call did not return
    result_name: str  # x0's name ("SUCCESS", "NOT_SUPPORTED", ...) where the service gives one
    seconds: float  # in the handler
    at: float  # seconds from the start of the trace to the answer
    note: str  # why the dispatcher refused it, if it did ("not offered over smc")
    line: str  # the `--trace smccc` line

    def arg(self, which: int | str) -> int:
        """An argument by name, or by register number (1 = x1)."""
        if isinstance(which, str):
            return self.args[self.arg_names.index(which)]
        return self.args[which - 1]

    @property
    def x0(self) -> int | None:
        return None if self.results is None else self.results[0]

    @property
    def status(self) -> int | None:
        """x0 as a signed number (SMCCC and PSCI error codes are negative)."""
        from pyvmm.smccc.service import signed

        return None if self.results is None else signed(self.results[0])

    def __str__(self) -> str:
        return self.line


@dataclass(frozen=True)
class TracedEvent:
    """What a service did to a vCPU between calls (an SDEI dispatch or completion)."""

    seq: int
    vcpu: int
    source: str
    text: str
    at: float

    def __str__(self) -> str:
        return f"[vcpu{self.vcpu} {self.source}] --- {self.text} ---"


class SmcccTrace:
    """A Dispatcher.trace hook that keeps each call as a TracedCall (and each service event as
    a TracedEvent), in the order they were answered, for a test to assert on."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self._lock = threading.Lock()  # every vCPU thread reports here
        self._entries: list[TracedCall | TracedEvent] = []
        self.unavailable = False  # the host has no SMCCC filter: nothing can be traced

    def attach(self, vm: Vm) -> None:
        """Record `vm`'s forwarded calls; without the SMCCC filter there are none to record."""
        if vm.has_smccc_filter:
            vm.smccc.trace = self
        else:
            self.unavailable = True

    def _check(self) -> None:
        # an empty trace would pass a test's "no SYSTEM_RESET was called" without looking
        if self.unavailable:
            from pyvmm.smccc import filter as smccc_filter

            raise smccc_filter.unavailable("the SMCCC trace (a PayloadRun's or the linux fixture's)")

    def __call__(self, record: TraceRecord | TraceEvent) -> None:
        from pyvmm.smccc.context import TraceEvent
        from pyvmm.smccc.trace import format_record

        at = time.monotonic() - self.started
        with self._lock:
            seq = len(self._entries)
            if isinstance(record, TraceEvent):
                self._entries.append(TracedEvent(seq, record.vcpu, record.source, record.text, at))
                return
            fn = record.function
            result_name = ""
            if record.results is not None:
                if fn is None or record.note:
                    result_name = "NOT_SUPPORTED"
                elif fn.describe is not None:
                    result_name = fn.describe(record.results[0])
            self._entries.append(TracedCall(
                seq, record.vcpu, record.conduit, record.function_id,
                fn.name if fn is not None else f"{record.function_id:#010x}", fn is not None,
                fn.args[:len(record.args)] if fn is not None else (), record.args, record.results, result_name,
                record.seconds, at, record.note, format_record(record)))

    @property
    def calls(self) -> list[TracedCall]:
        self._check()
        with self._lock:
            return [e for e in self._entries if isinstance(e, TracedCall)]

    @property
    def events(self) -> list[TracedEvent]:
        self._check()
        with self._lock:
            return [e for e in self._entries if isinstance(e, TracedEvent)]

    def calls_to(self, function: str | int, *, vcpu: int | None = None) -> list[TracedCall]:
        """The calls of one function, by name or function ID (on one vCPU)."""
        return [c for c in self.calls if (c.name == function if isinstance(function, str) else
                                          c.function_id == function) and (vcpu is None or c.vcpu == vcpu)]

    def names(self) -> list[str]:
        """The functions called, in order."""
        return [c.name for c in self.calls]

    def by_function(self) -> dict[str, list[TracedCall]]:
        grouped: dict[str, list[TracedCall]] = {}
        for c in self.calls:
            grouped.setdefault(c.name, []).append(c)
        return grouped

    def text(self) -> str:
        """The whole trace as `pyvmm run --trace smccc` prints it."""
        with self._lock:
            return "\n".join(str(e) for e in self._entries)

    def __len__(self) -> int:
        return len(self.calls)


# --- run_payload -------------------------------------------------------------------------------
@dataclass
class PayloadRun:
    """What one run_payload() gave."""

    result: RunResult  # why the run ended: result.reason is "poweroff" after SYSTEM_OFF
    reports: list[Report]  # FN_REPORT calls, in the order they were answered
    trace: SmcccTrace
    console: bytes  # what the guest wrote to the UART
    binary: Path | None  # the payload that ran (None: given as bytes)
    vm: Vm  # still open (closed after the test): its services' state can be inspected

    @property
    def reason(self) -> str:
        return self.result.reason

    @property
    def values(self) -> list[tuple[int, ...]]:
        """Each report's x1..x6."""
        return [r.values for r in self.reports]

    def tagged(self, tag: int) -> list[tuple[int, ...]]:
        """The x2..x6 of the reports whose x1 is `tag`."""
        return [r.values[1:] for r in self.reports if r.values[0] == tag]


class RunPayload:
    """The `run_payload` fixture: run_payload(payload, ...) -> PayloadRun, on a fresh VM."""

    def __init__(self, item: pytest.Item) -> None:
        self._item = item
        self._vms: list[Vm] = []
        self._payloads: Payloads | None = None

    def __call__(self, payload: str | os.PathLike[str] | bytes, *, services: Iterable[ServiceSpec] = (),
                 conduit: str = "hvc", cpus: int = 1, mem_mib: int = 16, defsyms: Mapping[str, int] | None = None,
                 psci: bool | None = None, reports: bool | None = None, configure: Callable[[Vm], None] | None = None,
                 timeout: float | None = None, unhandled_mmio: str = "ignore") -> PayloadRun:
        """Run `payload` until it powers off, fails, or `timeout` (default: the test's limit)
        passes. `payload`: a `.S`/`.s` file (assembled for `conduit`, with `defsyms`), a flat
        binary file, or its bytes, loaded and entered at the start of RAM. `services` are added
        to PSCI (`psci=False`: KVM's own PSCI answers; the default: pyvmm's where the host has
        the SMCCC filter, see Vm) and, with `reports`, the FN_REPORT service; `configure(vm)`
        runs last, before the guest does (vm.enable_sdei(), ...). Without the SMCCC filter
        (Linux < 6.4) services cannot be had: `reports` (default: where the filter is) is then
        off, and reading the trace raises SmcccFilterUnavailableError instead of finding it empty."""
        require_kvm(self._item)
        from pyvmm.errors import VmmError
        from pyvmm.machine.vm import Vm

        config = self._item.config
        binary: Path | None = None
        if not isinstance(payload, bytes):
            path = _in_project(config, payload)
            if path.suffix in (".S", ".s"):
                if self._payloads is None:
                    self._payloads = Payloads(config)
                binary = self._payloads.build(path, conduit=conduit, defsyms=defsyms)
            elif defsyms:
                raise ValueError(f"defsyms are for a payload assembled here, not the binary {path}")
            else:
                binary = path
        limit = _seconds(timeout, "timeout=") if timeout is not None else time_limit(self._item)
        console = bytearray()
        got: list[Report] = []
        trace = SmcccTrace()
        try:
            vm = Vm(cpus=cpus, mem_mib=mem_mib, conduit=conduit, psci=psci, console=console.append,
                    unhandled_mmio=unhandled_mmio)
            self._vms.append(vm)
            if vm.has_smccc_filter if reports is None else reports:
                vm.smccc.add_service(report_service(got))
            add_services(vm.smccc, vm.service_context, services, config.rootpath)
            trace.attach(vm)
            entry = vm.load(payload) if isinstance(payload, bytes) else vm.load_file(cast(Path, binary))
            vm.set_boot(entry)
        except VmmError as e:  # a service module that does not load, a payload too big for RAM, ...
            pytest.fail(f"pyvmm: {e}", pytrace=False)
        if configure is not None:
            configure(vm)  # the test's own code: its errors keep their tracebacks
        result = vm.run(limit)
        run = PayloadRun(result, got, trace, bytes(console), binary, vm)
        # shown with the test's failure: what this run did, as `pyvmm run --trace smccc` shows it
        what = f"{len(payload)} bytes" if isinstance(payload, bytes) else cast(Path, binary).name
        lines = trace.text().splitlines()
        if len(lines) > REPORT_SECTION_LINES:
            lines = [f"... the first {len(lines) - REPORT_SECTION_LINES} of {len(lines)} lines left out",
                     *lines[-REPORT_SECTION_LINES:]]
        console_text = run.console[-4096:].decode(errors="replace")
        self._item.add_report_section("call", f"pyvmm run {len(self._vms)} ({what}, {conduit}, {cpus} vCPUs)",
                                      "\n".join([f"ended: {result}", *lines])
                                      + (f"\nconsole (its end):\n{console_text}" if console_text else ""))
        return run

    def close(self) -> None:
        for vm in self._vms:
            vm.close()
        self._vms.clear()


# --- Linux guests ------------------------------------------------------------------------------
class LinuxBoot:
    """One Linux guest (pyvmm.exec.session.LinuxSession), booted at its first command. A guest that
    dies, or whose command runs out of time, is let go: the next command boots a new one. A
    boot that fails is not tried again for the tests that share it."""

    def __init__(self, options: dict[str, Any], *, services: Sequence[ServiceSpec] = (),
                 configure: Callable[[Vm], None] | None = None, boot_timeout: float, base: Path) -> None:
        self.options, self.services, self.configure = options, services, configure
        self.boot_timeout, self.base = boot_timeout, base
        self._session: LinuxSession | None = None
        self.trace = SmcccTrace()
        self.boot_error: str | None = None

    def session(self) -> LinuxSession:
        if self._session is not None:
            return self._session
        if self.boot_error is not None:
            pytest.fail(f"pyvmm: the Linux guest failed to boot for an earlier test: {self.boot_error}", pytrace=False)
        from pyvmm.errors import VmmError
        from pyvmm.exec.session import GuestTimedOut, LinuxSession

        trace = SmcccTrace()

        def configure(vm: Vm) -> None:
            add_services(vm.smccc, vm.service_context, self.services, self.base)
            trace.attach(vm)
            if self.configure is not None:
                self.configure(vm)

        try:
            session = LinuxSession(**self.options, configure=configure)
        except VmmError as e:
            self.boot_error = str(e)
            raise
        try:
            session.start(timeout=self.boot_timeout)
        except GuestTimedOut:
            session.stop("the guest did not boot in time")
            session.close()
            self.boot_error = f"the Linux guest was not ready within {self.boot_timeout:g} s (pyvmm_boot_timeout)"
            raise GuestTimedOut(self.boot_error) from None
        except BaseException as e:
            session.close()
            self.boot_error = str(e) or type(e).__name__
            raise
        self._session, self.trace = session, trace
        return session

    def discard(self) -> None:
        """Stop and close the guest (a new one boots for the next command)."""
        session, self._session = self._session, None
        if session is not None:
            session.stop("let go by the pytest plugin")
            session.close()

    def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            session.close()


class LinuxGuest:
    """A Linux guest as a test uses it: run() commands in it, each within the test's limit."""

    def __init__(self, boot: LinuxBoot, item: pytest.Item) -> None:
        self._boot, self._item = boot, item

    @property
    def session(self) -> LinuxSession:
        """The LinuxSession, booted if it was not yet."""
        require_kvm(self._item)
        return self._boot.session()

    @property
    def trace(self) -> SmcccTrace:
        """The SMCCC calls of the guest now running (or last run), from its boot on."""
        return self._boot.trace

    def run(self, command: Sequence[str] | str, *, env: Mapping[str, str] | None = None, cwd: str = "/",
            timeout: float | None = None) -> Completed:
        """Run `command` (argv, or a string for sh -c) in the guest: Completed(status, stdout,
        stderr). A status is the command's; GuestTimedOut after `timeout` (default: the test's
        limit), GuestFailed if the guest ends first (the next command boots a new guest)."""
        from pyvmm.exec.session import GuestFailed, GuestTimedOut

        limit = _seconds(timeout, "timeout=") if timeout is not None else time_limit(self._item)
        session = self.session
        shown = command if isinstance(command, str) else " ".join(command)
        try:
            done = session.run(command, env=env, cwd=cwd, timeout=limit)
        except GuestTimedOut:
            self._boot.discard()
            raise GuestTimedOut(f"`{shown}` did not finish within {limit:g} s; its guest was stopped") from None
        except GuestFailed:
            self._boot.discard()
            raise
        self._item.add_report_section("call", f"pyvmm linux `{shown}`",
                                      f"status {done.status}\nstdout: {done.stdout[-2048:]!r}\n"
                                      f"stderr: {done.stderr[-2048:]!r}")
        return done


def _linux_scope(fixture_name: str, config: pytest.Config) -> Scope:
    scope = str(config.getini("pyvmm_linux_scope")).strip() or "module"
    if scope not in SCOPES:
        raise pytest.UsageError(f"pyvmm: ini option pyvmm_linux_scope is one of {', '.join(SCOPES)}, not {scope!r}")
    return cast(Scope, scope)


def _ini_int(config: pytest.Config, name: str) -> int:
    text = str(config.getini(name)).strip()
    try:
        value = int(text, 0)
    except ValueError:
        value = 0
    if value < 1:
        raise pytest.UsageError(f"pyvmm: ini option {name} must be a whole number above 0, not {text!r}")
    return value


def linux_options(config: pytest.Config) -> dict[str, Any]:
    """LinuxSession's arguments from the ini options."""
    kernel = str(config.getini("pyvmm_linux_kernel")).strip()
    modules = str(config.getini("pyvmm_linux_modules")).strip()
    return {
        "kernel": str(_ini_base(config) / kernel) if kernel else None,
        "modules": str(_ini_base(config) / modules) if modules else None,
        "cpus": _ini_int(config, "pyvmm_linux_cpus"),
        "mem_mib": _ini_int(config, "pyvmm_linux_mem"),
        "params": str(config.getini("pyvmm_linux_params")).strip(),
        "rwdirs": [str(p) for p in cast(list[Path], config.getini("pyvmm_linux_rwdirs"))],
    }


class MakeLinux:
    """The `make_linux` fixture: make_linux(...) -> a booted LinuxGuest of its own."""

    def __init__(self, item: pytest.Item) -> None:
        self._item = item
        self._boots: list[LinuxBoot] = []

    def __call__(self, *, kernel: str | os.PathLike[str] | None = None, modules: str | os.PathLike[str] | None = None,
                 rwdirs: Sequence[str | os.PathLike[str]] | None = None, cpus: int | None = None,
                 mem_mib: int | None = None, params: str | None = None, conduit: str = "hvc",
                 console_log: str | os.PathLike[str] | None = None, services: Sequence[ServiceSpec] = (),
                 configure: Callable[[Vm], None] | None = None, boot_timeout: float | None = None) -> LinuxGuest:
        """Boot a Linux guest (what is not given comes from the pyvmm_linux_* ini options):
        `services` are added to its VM and `configure(vm)` runs before it boots."""
        require_kvm(self._item)
        config = self._item.config
        options = linux_options(config)
        given = {"kernel": kernel, "modules": modules, "cpus": cpus, "mem_mib": mem_mib, "params": params,
                 "rwdirs": None if rwdirs is None else [str(d) for d in rwdirs]}
        options.update({k: str(v) if isinstance(v, os.PathLike) else v for k, v in given.items() if v is not None})
        options["conduit"] = conduit
        options["console_log"] = None if console_log is None else str(console_log)
        limit = (_seconds(boot_timeout, "boot_timeout=") if boot_timeout is not None
                 else _seconds(config.getini("pyvmm_boot_timeout"), "ini option pyvmm_boot_timeout"))
        boot = LinuxBoot(options, services=services, configure=configure, boot_timeout=limit, base=config.rootpath)
        self._boots.append(boot)
        boot.session()
        return LinuxGuest(boot, self._item)

    def close(self) -> None:
        for boot in self._boots:
            boot.close()


# --- the fixtures --------------------------------------------------------------------------------
def _item(request: pytest.FixtureRequest) -> pytest.Item:
    node = request.node
    assert isinstance(node, pytest.Item), node  # the function-scoped fixtures below
    return node


@pytest.fixture(scope="session")
def pyvmm_payloads(pytestconfig: pytest.Config) -> Payloads:
    """Assemble `.S` payloads through the payload cache: pyvmm_payloads.build(path, conduit=,
    defsyms=) -> the binary's Path. Needs no KVM."""
    return Payloads(pytestconfig)


@pytest.fixture
def run_payload(request: pytest.FixtureRequest) -> Iterator[RunPayload]:
    """run_payload(payload, services=, conduit=, cpus=, ...) -> PayloadRun, each on a fresh VM
    (closed after the test)."""
    runner = RunPayload(_item(request))
    yield runner
    runner.close()


@pytest.fixture(scope=_linux_scope)
def _pyvmm_linux_shared(pytestconfig: pytest.Config) -> Iterator[LinuxBoot]:
    boot = LinuxBoot(linux_options(pytestconfig), base=pytestconfig.rootpath,
                     boot_timeout=_seconds(pytestconfig.getini("pyvmm_boot_timeout"), "ini option pyvmm_boot_timeout"))
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

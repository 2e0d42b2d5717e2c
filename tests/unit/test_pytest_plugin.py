"""The pytest plugin (pyvmm/pytest_plugin.py) as a user meets it, with pytester, on any host: a
test that needs arm64 KVM where there is none fails in one line (or is skipped, and counted,
with --pyvmm-skip-without-kvm); the fixtures' wiring around a VM (services, reports, the SMCCC
trace, time limits, teardown) and around LinuxSession (one boot shared, a fresh one after a
time-out, a failed boot not retried), against fakes of Vm and LinuxSession that keep their
APIs; the SMCCC trace recorder on a real dispatcher; the payload cache and its missing-
assembler message. tests/kvm/test_pytest_plugin.py runs the example project on real KVM."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, cast

import pytest

import pyvmm.exec.session
import pyvmm.machine.vm
import pyvmm.pytest_plugin as plugin
from kvm_bindings.constants import HypercallExitFlag
from pyvmm.exec.session import Completed, GuestFailed, GuestTimedOut
from pyvmm.machine.lifecycle import RunResult
from pyvmm.services.psci import Psci
from pyvmm.smccc.context import TraceEvent
from pyvmm.smccc.dispatcher import Dispatcher
from pyvmm.smccc.trace import format_record
from pyvmm.testing import hooks, payload
from tests.conftest import ROOT
from tests.unit.fakes import FakeMachine, machine

pytest_plugins = ["pytester"]

EXAMPLE = ROOT / "examples" / "user_project"
COUNTER_ADD = 0xC300_0001
SMC = HypercallExitFlag.SMC.value
NEEDS_KVM = "pyvmm: this test needs arm64 KVM: "

USES_KVM = """
import pytest

def test_payload(run_payload):
    run_payload("guest.S")

def test_linux(linux):
    linux.run("true")

def test_make_linux(make_linux):
    make_linux()

@pytest.mark.pyvmm_kvm
def test_marked():
    pass

def test_plain():
    pass
"""


@pytest.fixture
def run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> Callable[..., pytest.RunResult]:
    """pytest in pytester's directory with the plugin loaded by -p, as from a checkout: the
    entry point stays out (where pyvmm is installed it would load the plugin a second time)."""
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.delenv(payload.CACHE_ENV, raising=False)

    def run(*args: str) -> pytest.RunResult:
        # this process has imported the plugin already, so pytest cannot rewrite its asserts: it
        # has none to rewrite
        return pytester.runpytest("-p", "pyvmm.pytest_plugin", "-p", "no:cacheprovider",
                                  "-W", "ignore::pytest.PytestAssertRewriteWarning", *args)

    return run


@pytest.fixture
def no_kvm(monkeypatch: pytest.MonkeyPatch) -> str:
    """This host has no arm64 KVM, whatever it is."""
    why = "/dev/kvm does not exist: this host has no KVM"
    monkeypatch.setattr(hooks, "kvm_problem", lambda: why)
    return why


def failure_lines(result: pytest.RunResult) -> list[str]:
    """The lines of the FAILURES section that are not headers."""
    out = result.stdout.lines
    start = next(i for i, line in enumerate(out) if "FAILURES" in line) + 1
    end = next(i for i, line in enumerate(out) if i > start and (line.startswith("=") or re.match(r"pyvmm: \d", line)))
    return [line for line in out[start:end] if not line.startswith("____")]


# --- the KVM requirement ---------------------------------------------------------------------------
@pytest.mark.parametrize("skip", [False, True])
def test_under_xdist_the_summary_counts_what_the_workers_ran(pytester: pytest.Pytester,
                                                            monkeypatch: pytest.MonkeyPatch, skip: bool) -> None:
    """pytest-xdist's workers run the tests, its controller writes the summary: the tests that
    ended for want of KVM reach it on their reports, and the line is the same as in one process."""
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # this checkout's pyvmm, in every process
    pytester.makepyfile(test_uses=USES_KVM)
    # each worker is a process of its own: each is told this host has no KVM
    pytester.makeconftest("import pyvmm.testing.hooks as hooks\nhooks.kvm_problem = lambda: 'no KVM in this test'\n")
    result = pytester.runpytest_subprocess("-p", "pyvmm.pytest_plugin", "-p", "xdist", "-p", "no:cacheprovider",
                                           "-n", "2", *(["--pyvmm-skip-without-kvm"] if skip else []))
    if skip:
        result.assert_outcomes(skipped=4, passed=1)
        line = "pyvmm: 4 tests skipped for want of arm64 KVM (--pyvmm-skip-without-kvm): no KVM in this test"
    else:
        result.assert_outcomes(failed=4, passed=1)
        line = ("pyvmm: 4 tests failed for want of arm64 KVM (--pyvmm-skip-without-kvm would skip them): "
                "no KVM in this test")
    assert line in result.stdout.lines, result.stdout.str()
    assert any("created: 2/2 workers" in x for x in result.stdout.lines), result.stdout.str()


def test_without_kvm_each_test_that_needs_it_fails_with_one_line(run: Callable[..., pytest.RunResult],
                                                                 pytester: pytest.Pytester, no_kvm: str) -> None:
    pytester.makepyfile(test_uses=USES_KVM)
    result = run()
    # failed, not errors: fixture setup touches no KVM, the check is the test's call
    result.assert_outcomes(failed=4, passed=1)
    assert failure_lines(result) == [NEEDS_KVM + no_kvm] * 4
    assert f"pyvmm: 4 tests failed for want of arm64 KVM (--pyvmm-skip-without-kvm would skip them): {no_kvm}" \
        in result.stdout.lines


@pytest.mark.skipif(os.uname().machine == "aarch64", reason="the host's own reason, off arm64")
def test_off_arm64_the_reason_is_the_host(run: Callable[..., pytest.RunResult], pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_uses=USES_KVM)
    result = run()
    result.assert_outcomes(failed=4, passed=1)
    assert set(failure_lines(result)) == {f"{NEEDS_KVM}this host is {os.uname().machine}, not arm64 (aarch64)"}


def test_the_option_skips_them_instead_and_the_summary_counts_them(run: Callable[..., pytest.RunResult],
                                                                   pytester: pytest.Pytester, no_kvm: str) -> None:
    pytester.makepyfile(test_uses=USES_KVM)
    result = run("--pyvmm-skip-without-kvm", "-rs")
    result.assert_outcomes(skipped=4, passed=1)
    pyvmm_lines = [line for line in result.stdout.lines if line.startswith("pyvmm: ")]
    assert pyvmm_lines == [f"pyvmm: 4 tests skipped for want of arm64 KVM (--pyvmm-skip-without-kvm): {no_kvm}"]
    assert result.stdout.lines.count(next(line for line in result.stdout.lines if line.startswith("SKIPPED [4]"))) == 1


def test_a_run_that_uses_nothing_of_the_plugin_hears_nothing_of_it(run: Callable[..., pytest.RunResult],
                                                                   pytester: pytest.Pytester, no_kvm: str) -> None:
    pytester.makepyfile(test_plain="def test_plain():\n    pass\n")
    result = run("--pyvmm-skip-without-kvm")
    result.assert_outcomes(passed=1)
    assert not [line for line in result.stdout.lines if "pyvmm" in line]


def test_the_plugin_imports_nothing_that_pyvmm_itself_does_not() -> None:
    """Loaded into every pytest run where pyvmm is installed: its own modules (pyvmm.testing) and
    none of pyvmm's machinery, nor anything else."""
    code = ("import sys, pyvmm, pytest; before = set(sys.modules); import pyvmm.pytest_plugin; "
            "print(sorted(set(sys.modules) - before))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    loaded = eval(p.stdout)  # a list of module names
    assert "pyvmm.pytest_plugin" in loaded
    assert [m for m in loaded if not m.startswith(("pyvmm.pytest_plugin", "pyvmm.testing"))] == []


# --- run_payload against a fake Vm -----------------------------------------------------------------
class FakeVm:
    """What the fixtures use of pyvmm.machine.vm.Vm (its dispatcher, service context, loading, run and
    close), on fake vCPUs. run() plays `script`: (vCPU, function ID, registers it sets, flags)."""

    made: ClassVar[list[FakeVm]] = []
    script: ClassVar[list[tuple[int, int, dict[int, int], int]]] = []

    has_smccc_filter = True  # a host of Linux >= 6.4: pyvmm's PSCI is the default

    def __init__(self, *, cpus: int = 1, mem_mib: int = 64, conduit: str = "hvc", psci: bool | None = None,
                 console: Callable[[int], None] | None = None, unhandled_mmio: str = "ignore",
                 **more: object) -> None:
        psci = self.has_smccc_filter if psci is None else psci
        self.options = dict(cpus=cpus, mem_mib=mem_mib, conduit=conduit, psci=psci, unhandled_mmio=unhandled_mmio)
        self.more = more
        self.machine: FakeMachine = machine(cpus, conduit=conduit)
        self.smccc = Dispatcher(conduit)
        self.service_context = self.machine.context(self.smccc.emit)
        if psci:
            self.smccc.add_service(Psci(self.service_context))
        self.console = console
        self.loaded: list[bytes] = []
        self.entry: int | None = None
        self.timeout: float | None = None
        self.closed = False
        FakeVm.made.append(self)

    def load(self, data: bytes, gpa: int | None = None) -> int:
        self.loaded.append(bytes(data))
        return 0x8000_0000

    def load_file(self, path: str | os.PathLike[str], gpa: int | None = None) -> int:
        return self.load(Path(path).read_bytes())

    def set_boot(self, entry: int) -> None:
        self.entry = entry

    def run(self, timeout: float | None = None) -> RunResult:
        self.timeout = timeout
        for index, fid, regs, flags in self.script:
            vcpu = self.machine.vcpus[index]
            vcpu.x.update(regs)
            self.smccc.dispatch(vcpu, fid, flags)
        if self.console is not None:
            for byte in b"hi\n":
                self.console(byte)
        return RunResult("poweroff", "SYSTEM_OFF", 0)

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def fake_vm(monkeypatch: pytest.MonkeyPatch) -> type[FakeVm]:
    monkeypatch.setattr(hooks, "kvm_problem", lambda: None)
    monkeypatch.setattr(pyvmm.machine.vm, "Vm", FakeVm)
    monkeypatch.setattr(FakeVm, "made", [])
    return FakeVm


def project(pytester: pytest.Pytester, ini: str = "") -> None:
    """The example project's service and guest in pytester's directory, with `ini` options."""
    shutil.copy(EXAMPLE / "counter_service.py", pytester.path)
    (pytester.path / "guests").mkdir()
    shutil.copy(EXAMPLE / "guests" / "counter.S", pytester.path / "guests")
    pytester.makeini(f"[pytest]\n{ini}\n")


def test_run_payload_builds_runs_and_gives_reports_and_the_trace(run: Callable[..., pytest.RunResult],
                                                                 pytester: pytest.Pytester,
                                                                 fake_vm: type[FakeVm],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # vCPU 1 calls ADD(100) over SMC, reports (8, status, count), then vCPU 0 calls SYSTEM_OFF
    monkeypatch.setattr(FakeVm, "script", [(1, COUNTER_ADD, {1: 100}, SMC),
                                           (1, plugin.FN_REPORT, {1: 8, 2: 0, 3: 100, 4: 0, 5: 0, 6: 0}, SMC),
                                           (0, 0x8400_0008, {}, SMC)])
    project(pytester, "pyvmm_timeout = 9")
    pytester.makepyfile(test_guest="""
        import pytest

        def test_counter(run_payload, pytestconfig):
            run = run_payload("guests/counter.S", services=["counter_service.py"], conduit="smc", cpus=2)
            assert run.reason == "poweroff"
            assert run.binary.parent == pytestconfig.rootpath / "build" / "pyvmm-payloads"
            assert run.binary.name.startswith("counter-smc-")
            assert run.vm.loaded == [run.binary.read_bytes()] and run.vm.entry == 0x80000000
            assert run.vm.options == dict(cpus=2, mem_mib=16, conduit="smc", psci=True, unhandled_mmio="ignore")
            assert run.vm.timeout == 9
            assert [(r.vcpu, r.values) for r in run.reports] == [(1, (8, 0, 100, 0, 0, 0))]
            assert run.tagged(8) == [(0, 100, 0, 0, 0)]
            add, report, off = run.trace.calls
            assert (add.vcpu, add.conduit, add.function_id, add.name) == (1, "smc", 0xC3000001, "counter service[0x1]")
            assert (add.arg(1), add.results, add.status) == (100, (0, 100), 0)
            assert (report.name, report.arg("x3")) == ("REPORT", 100)
            assert (off.name, off.results) == ("SYSTEM_OFF", None)
            assert run.console == b"hi\\n"

        @pytest.mark.pyvmm_timeout(4)
        def test_its_own_limit_and_bytes(run_payload):
            run = run_payload(bytes.fromhex("00000014"), cpus=2, reports=False, psci=False, timeout=None)
            assert run.vm.timeout == 4 and run.vm.loaded == [bytes.fromhex("00000014")] and run.binary is None
            assert run.vm.smccc.services == []
            assert run_payload(b"\\0" * 4, cpus=2, timeout=0.5).vm.timeout == 0.5
            assert run.tagged(8) == []  # no report service: the script's report is NOT_SUPPORTED
            assert run.trace.calls[1].result_name == "NOT_SUPPORTED"

        def test_failing(run_payload):
            run_payload("guests/counter.S", services=["counter_service.py"], conduit="smc", cpus=2)
            assert False, "to see the run's section"
    """)
    result = run()
    result.assert_outcomes(passed=2, failed=1)
    assert len(FakeVm.made) == 4 and all(vm.closed for vm in FakeVm.made)  # each closed after its test
    # a failing test shows what its runs did: the end, and the trace as --trace smccc prints it
    result.stdout.fnmatch_lines(["*Captured pyvmm run 1 (counter-smc-*.bin, smc, 2 vCPUs) call*",
                                 "ended: poweroff (vcpu0): SYSTEM_OFF",
                                 "[[]vcpu1 smc[]] counter service[[]0x1[]](x1=0x64, *) = 0x0, 0x64 *",
                                 "*console (its end):", "hi"])


def test_payload_vm_gives_the_run_before_it_starts(run: Callable[..., pytest.RunResult], pytester: pytest.Pytester,
                                                  fake_vm: type[FakeVm], monkeypatch: pytest.MonkeyPatch) -> None:
    """payload_vm: the VM set up as run_payload's, not run; the test reaches it through .vm, hears
    each report as it comes (on_report), runs it with .run(), and the run's section is shown."""
    monkeypatch.setattr(FakeVm, "script", [(1, plugin.FN_REPORT32, {1: 8, 2: 7}, 0), (0, 0x8400_0008, {}, 0)])
    project(pytester)
    pytester.makepyfile(test_guest="""
        import pytest

        def test_set_up_then_run(payload_vm):
            guest = payload_vm(bytes(4), cpus=2, aarch32=True, irqchip="gicv2")
            assert guest.vm.loaded and guest.vm.timeout is None and guest.reports == []
            with pytest.raises(RuntimeError, match="has not run yet"):
                guest.result
            assert guest.vm.more == dict(aarch32=True, cpu=pytest.importorskip("pyvmm.machine.cpu_features")
                                         .AS_THE_HOST_OFFERS, irqchip="gicv2")
            heard = []
            guest.on_report(lambda report: heard.append((report, list(guest.reports))))
            assert guest.run(5) is guest and guest.reason == "poweroff" and guest.vm.timeout == 5
            report = guest.reports[0]
            assert heard == [(report, [report])] and guest.tagged(8) == [(7, 0, 0, 0, 0)]
            fast = payload_vm(bytes(4), cpus=2, trace=False)
            assert fast.vm.smccc.trace is None and fast.run().reason == "poweroff"  # the fast path
            with pytest.raises(RuntimeError, match="ran with trace=False"):
                fast.trace.calls
            assert False, "to see the run's section"
    """)
    result = run()
    result.assert_outcomes(failed=1)
    assert len(FakeVm.made) == 2 and all(vm.closed for vm in FakeVm.made)
    result.stdout.fnmatch_lines(["*assert False*", "*Captured pyvmm run 1 (4 bytes, hvc, 2 vCPUs) call*",
                                 "ended: poweroff (vcpu0): SYSTEM_OFF"])


def test_services_come_as_module_files_modules_services_or_factories(fake_vm: type[FakeVm]) -> None:
    from pyvmm.errors import VmmError
    from pyvmm.services.modules import ServiceModule, load_service_module
    from pyvmm.services.std_hyp import StandardHypervisor

    vm = FakeVm(cpus=1)
    module = load_service_module(str(EXAMPLE / "counter_service.py"))
    made: list[object] = []

    def factory(ctx: Any) -> Psci:
        made.append(ctx)
        return Psci(ctx)

    plugin.add_services(vm.smccc, vm.service_context, ["counter_service.py"], EXAMPLE)
    plugin.add_services(vm.smccc, vm.service_context,
                        [ServiceModule(0xC600_0000, 4, module.handle, "again"), StandardHypervisor()],
                        Path("/nonexistent"))
    other = FakeVm(cpus=1, psci=False)
    plugin.add_services(other.smccc, other.service_context, [factory], EXAMPLE)
    assert made == [other.service_context] and len([s for s in other.smccc.services if isinstance(s, Psci)]) == 1
    names = [fn.name for fid in (COUNTER_ADD, 0xC600_0001) if (fn := vm.smccc.resolve(fid)) is not None]
    assert names == ["counter service[0x1]", "again[0x1]"]
    with pytest.raises(VmmError, match="is not a service"):
        plugin.add_services(vm.smccc, vm.service_context, cast(Any, [42]), EXAMPLE)  # what a user may pass
    with pytest.raises(VmmError, match="returned None, not a pyvmm Service"):
        plugin.add_services(vm.smccc, vm.service_context, cast(Any, [lambda ctx: None]), EXAMPLE)
    with pytest.raises(VmmError, match="no-such.py does not exist"):
        plugin.add_services(vm.smccc, vm.service_context, ["no-such.py"], EXAMPLE)


@pytest.mark.parametrize("aarch32", [False, True])
def test_the_report_service_takes_its_guests_report_call_and_tells_its_listeners(aarch32: bool) -> None:
    """FN_REPORT (SMC64), or pyvmm32.inc's FN_REPORT32 for an AArch32 guest (which has no SMC64),
    and not the other; listeners hear each report on the reporting vCPU's thread, as it comes."""
    m = machine(2)
    d = Dispatcher("hvc", aarch32_callers=aarch32)
    reports: list[plugin.Report] = []
    heard: list[plugin.Report] = []
    d.add_service(plugin.report_service(reports, [heard.append], aarch32))
    ours, other = (plugin.FN_REPORT32, plugin.FN_REPORT) if aarch32 else (plugin.FN_REPORT, plugin.FN_REPORT32)
    v0, v1 = m.vcpus
    v0.x.update({n: 0x1_0000_0000 + n for n in range(1, 7)})
    d.dispatch(v0, ours, 0)
    v1.x.update({n: n for n in range(1, 7)})
    d.dispatch(v1, other, 0)
    values = tuple(range(1, 7)) if aarch32 else tuple(0x1_0000_0000 + n for n in range(1, 7))  # SMC32: w1..w6
    assert reports == heard == [plugin.Report(0, values)]
    assert (v0.x[0], v1.x[0]) == (0, (1 << 64) - 1 if other & 1 << 30 else (1 << 32) - 1)  # the other: NOT_SUPPORTED


# --- the SMCCC trace recorder on a real dispatcher --------------------------------------------------
def test_the_trace_keeps_each_call_as_data() -> None:
    m = machine(2)
    d = Dispatcher("hvc")
    psci = Psci(m.context(d.emit))
    d.add_service(psci)
    reports: list[plugin.Report] = []
    d.add_service(plugin.report_service(reports))
    plugin.add_services(d, m.context(d.emit), ["counter_service.py"], EXAMPLE)
    trace = plugin.SmcccTrace()
    d.trace = trace
    v0, v1 = m.vcpus

    v0.x.update({1: 1, 2: 0x8000_1000, 3: 7})
    d.dispatch(v0, 0xC400_0003, 0)  # CPU_ON(1, 0x80001000, 7)
    v0.x.update({1: 1, 2: 0x8000_1000, 3: 7})
    d.dispatch(v0, 0xC400_0003, 0)  # again: ALREADY_ON
    v1.x.update({1: 5})
    d.dispatch(v1, COUNTER_ADD, SMC)  # over the conduit this VM does not offer
    d.dispatch(v1, COUNTER_ADD, 0)
    d.emit(TraceEvent(1, "sdei", "dispatch event 0"))
    d.dispatch(v0, 0xC5FF_0000, 0)  # an ID no service has
    v1.x.update({n: 10 * n for n in range(1, 7)})
    d.dispatch(v1, plugin.FN_REPORT, 0)

    on, again, refused, add, unknown, report = trace.calls
    assert (on.seq, on.vcpu, on.conduit, on.function_id, on.name, on.implemented) == \
        (0, 0, "hvc", 0xC400_0003, "CPU_ON", True)
    assert on.arg_names == ("target_cpu", "entry_point_address", "context_id")
    assert (on.args, on.arg("entry_point_address"), on.arg(3)) == ((1, 0x8000_1000, 7), 0x8000_1000, 7)
    assert (on.results, on.x0, on.status, on.result_name) == ((0,), 0, 0, "SUCCESS")
    assert (again.status, again.result_name) == (-4, "ALREADY_ON")
    assert (refused.conduit, refused.status, refused.result_name, refused.note) == \
        ("smc", -1, "NOT_SUPPORTED", "not offered over smc")
    assert (add.vcpu, add.args[0], add.results) == (1, 5, (0, 5))
    assert add.arg_names == plugin.REPORT_ARGS  # a service module names no arguments: x1..x6
    assert (unknown.implemented, unknown.name, unknown.args, unknown.result_name) == \
        (False, "0xc5ff0000", (), "NOT_SUPPORTED")
    assert report.args == (10, 20, 30, 40, 50, 60) and reports == [plugin.Report(1, (10, 20, 30, 40, 50, 60))]
    event, = trace.events
    assert (event.seq, event.vcpu, event.source, event.text) == (4, 1, "sdei", "dispatch event 0")
    assert [c.seq for c in trace.calls] == [0, 1, 2, 3, 5, 6]
    assert [c.at for c in trace.calls] == sorted(c.at for c in trace.calls) and all(c.seconds >= 0 for c in trace.calls)
    assert trace.names() == ["CPU_ON", "CPU_ON", "counter service[0x1]", "counter service[0x1]", "0xc5ff0000", "REPORT"]
    assert trace.calls_to("CPU_ON") == [on, again] and trace.calls_to(COUNTER_ADD, vcpu=1) == [refused, add]
    assert list(trace.by_function()) == ["CPU_ON", "counter service[0x1]", "0xc5ff0000", "REPORT"]
    assert len(trace) == 6
    lines = trace.text().splitlines()
    assert lines[4] == "[vcpu1 sdei] --- dispatch event 0 ---"
    assert lines[0].startswith("[vcpu0 hvc] CPU_ON(target_cpu=0x1, entry_point_address=0x80001000, context_id=0x7) = "
                               "0x0 SUCCESS")
    assert str(on) == on.line == lines[0]


def test_the_trace_line_is_the_dispatchers_own() -> None:
    """TracedCall.line is format_record's, so a test shows what `--trace smccc` shows."""
    d, m = Dispatcher("hvc"), machine(1)
    seen: list[str] = []
    trace = plugin.SmcccTrace()

    def both(record: Any) -> None:
        seen.append(format_record(record))
        trace(record)

    d.add_service(Psci(m.context(d.emit)))
    d.trace = both
    d.dispatch(m.vcpus[0], 0x8400_0000, 0)
    assert [c.line for c in trace.calls] == seen and seen[0].startswith("[vcpu0 hvc] PSCI_VERSION() = 0x10001")


# --- linux and make_linux against a fake LinuxSession ------------------------------------------------
class FakeSession:
    """pyvmm.exec.session.LinuxSession's API: the options and configure(vm) when made, start() boots
    (Linux's PSCI_VERSION call at boot), run() answers `sleep 1000` with GuestTimedOut and any
    other command with status 3, b"out\\n", b"err\\n"."""

    made: ClassVar[list[FakeSession]] = []
    fail_start: ClassVar[BaseException | None] = None

    def __init__(self, *, kernel: str | None = None, modules: str | None = None, rwdirs: Sequence[str] = (),
                 cpus: int = 1, mem_mib: int = 512, params: str = "", console_log: str | None = None,
                 conduit: str = "hvc", stdout: Callable[[bytes], None] | None = None,
                 stderr: Callable[[bytes], None] | None = None, configure: Callable[[Any], None] | None = None) -> None:
        self.options = dict(kernel=kernel, modules=modules, rwdirs=list(rwdirs), cpus=cpus, mem_mib=mem_mib,
                            params=params, console_log=console_log, conduit=conduit)
        self.vm = FakeVm(cpus=cpus, conduit=conduit)
        if configure is not None:
            configure(self.vm)
        self.boot_timeout: float | None = None
        self.runs: list[tuple[Sequence[str] | str, float | None, str]] = []
        self.stopped = self.closed = False
        FakeSession.made.append(self)

    def start(self, timeout: float | None = None) -> None:
        self.boot_timeout = timeout
        if self.fail_start is not None:
            raise self.fail_start
        self.vm.smccc.dispatch(self.vm.machine.vcpus[0], 0x8400_0000, 0)

    def run(self, argv: Sequence[str] | str, *, env: Mapping[str, str] | None = None, cwd: str = "/",
            timeout: float | None = None) -> Completed:
        self.runs.append((argv, timeout, cwd))
        if argv == "sleep 1000":
            raise GuestTimedOut("timed out")
        return Completed(3, b"out\n", b"err\n")

    def stop(self, message: str) -> None:
        self.stopped = True

    def close(self, timeout: float = 10.0) -> RunResult | None:
        self.closed = True
        return None


@pytest.fixture
def fake_linux(monkeypatch: pytest.MonkeyPatch, fake_vm: type[FakeVm]) -> Iterator[type[FakeSession]]:
    monkeypatch.setattr(pyvmm.exec.session, "LinuxSession", FakeSession)
    monkeypatch.setattr(FakeSession, "made", [])
    monkeypatch.setattr(FakeSession, "fail_start", None)
    yield FakeSession


LINUX_TESTS = """
import pytest

def test_one(linux):
    done = linux.run(["echo", "hi"])
    assert (done.status, done.stdout, done.stderr) == (3, b"out\\n", b"err\\n")
    assert [c.name for c in linux.trace.calls] == ["PSCI_VERSION"]

@pytest.mark.pyvmm_timeout(4)
def test_two(linux):
    assert linux.run("true", cwd="/tmp").status == 3
"""


def test_linux_boots_once_for_the_module_at_its_first_command(run: Callable[..., pytest.RunResult],
                                                              pytester: pytest.Pytester,
                                                              fake_linux: type[FakeSession]) -> None:
    pytester.makeini("[pytest]\npyvmm_timeout = 9\npyvmm_boot_timeout = 30\npyvmm_linux_cpus = 2\n"
                     "pyvmm_linux_kernel = images/Image\npyvmm_linux_params = quiet\npyvmm_linux_rwdirs = out\n")
    pytester.makepyfile(test_linux=LINUX_TESTS + "\ndef test_three(linux):\n    pass\n")
    result = run()
    result.assert_outcomes(passed=3)
    session, = FakeSession.made
    assert session.options == dict(kernel=str(pytester.path / "images" / "Image"), modules=None,
                                   rwdirs=[str(pytester.path / "out")], cpus=2, mem_mib=512, params="quiet",
                                   console_log=None, conduit="hvc")
    assert session.boot_timeout == 30
    assert session.runs == [(["echo", "hi"], 9, "/"), ("true", 4, "/tmp")]
    assert session.closed


@pytest.mark.parametrize(("scope", "boots"), [("module", 2), ("session", 1), ("function", 4)])
def test_the_shared_guest_s_scope_is_an_ini_option(run: Callable[..., pytest.RunResult], pytester: pytest.Pytester,
                                                   fake_linux: type[FakeSession], scope: str, boots: int) -> None:
    pytester.makeini(f"[pytest]\npyvmm_linux_scope = {scope}\n")
    pytester.makepyfile(test_a=LINUX_TESTS, test_b=LINUX_TESTS)
    result = run()
    result.assert_outcomes(passed=4)
    assert len(FakeSession.made) == boots and all(s.closed for s in FakeSession.made)


def test_a_command_out_of_time_lets_its_guest_go_and_the_next_boots_anew(run: Callable[..., pytest.RunResult],
                                                                         pytester: pytest.Pytester,
                                                                         fake_linux: type[FakeSession]) -> None:
    pytester.makepyfile(test_linux="""
        import pytest
        from pyvmm.exec.session import GuestTimedOut

        @pytest.mark.pyvmm_timeout(2.5)
        def test_stuck(linux):
            with pytest.raises(GuestTimedOut, match=r"^`sleep 1000` did not finish within 2.5 s; its guest was stopped$"):
                linux.run("sleep 1000")
            assert linux.run("true").status == 3
    """)
    run().assert_outcomes(passed=1)
    first, second = FakeSession.made
    assert (first.stopped, first.closed, second.closed) == (True, True, True)
    assert [r[0] for r in first.runs] == ["sleep 1000"] and [r[0] for r in second.runs] == ["true"]


def test_a_failed_boot_fails_the_tests_sharing_it_without_booting_again(run: Callable[..., pytest.RunResult],
                                                                       pytester: pytest.Pytester,
                                                                       fake_linux: type[FakeSession],
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FakeSession, "fail_start", GuestFailed("the kernel panicked"))
    pytester.makepyfile(test_linux=LINUX_TESTS)
    result = run()
    result.assert_outcomes(failed=2)
    assert len(FakeSession.made) == 1 and FakeSession.made[0].closed
    result.stdout.fnmatch_lines(["E*pyvmm.exec.session.GuestFailed: the kernel panicked",
                                 "pyvmm: the Linux guest failed to boot for an earlier test: the kernel panicked"])


def test_make_linux_boots_a_guest_of_the_test_s_own(run: Callable[..., pytest.RunResult], pytester: pytest.Pytester,
                                                    fake_linux: type[FakeSession]) -> None:
    shutil.copy(EXAMPLE / "counter_service.py", pytester.path)
    pytester.makeini("[pytest]\npyvmm_linux_mem = 256\npyvmm_linux_params = quiet\n")
    pytester.makepyfile(test_linux="""
        def test_custom(make_linux):
            configured = []
            guest = make_linux(cpus=3, conduit="smc", services=["counter_service.py"], configure=configured.append,
                               boot_timeout=12)
            vm, = configured
            assert vm.smccc.resolve(0xC3000001).name == "counter service[0x1]"
            assert guest.session.vm is vm and guest.trace.names() == ["PSCI_VERSION"]
            assert guest.run("true").stdout == b"out\\n"
    """)
    run().assert_outcomes(passed=1)
    session, = FakeSession.made
    assert session.options == dict(kernel=None, modules=None, rwdirs=[], cpus=3, mem_mib=256, params="quiet",
                                   console_log=None, conduit="smc")
    assert (session.boot_timeout, session.closed) == (12, True)


@pytest.mark.parametrize(("option", "value", "why"), [
    ("pyvmm_timeout", "soon", "must be a number of seconds above 0, not 'soon'"),
    ("pyvmm_boot_timeout", "-1", "must be a number of seconds above 0, not '-1'"),
    ("pyvmm_linux_cpus", "0", "must be a whole number above 0, not '0'"),
    ("pyvmm_linux_scope", "forever", "is one of function, class, module, package, session, not 'forever'"),
])
def test_a_bad_ini_option_is_a_usage_error_at_start_up(run: Callable[..., pytest.RunResult],
                                                       pytester: pytest.Pytester, fake_linux: type[FakeSession],
                                                       option: str, value: str, why: str) -> None:
    pytester.makeini(f"[pytest]\n{option} = {value}\n")
    pytester.makepyfile(test_linux=LINUX_TESTS)
    result = run()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert f"ERROR: pyvmm: ini option {option} {why}" in result.stderr.lines
    assert FakeSession.made == []


# --- payloads: the cache, and without an assembler ------------------------------------------------------
GUEST = """\
    .include "pyvmm.inc"
    .include "values.inc"
    .text
    .global _start
_start:
    mov x3, #VALUE
    report_value 1, x3
    system_off
"""


@pytest.fixture
def sources(tmp_path: Path) -> Path:
    where = tmp_path / "proj"
    where.mkdir()
    (where / "guest.S").write_text(GUEST)
    (where / "values.inc").write_text("    .equ VALUE, 5\n")
    return where


def test_a_build_is_cached_and_named_by_what_goes_into_it(sources: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    cache = payload.PayloadCache(tmp_path / "cache")
    path, made = cache.build(sources / "guest.S", conduit="smc")
    assert made and path.parent == tmp_path / "cache" and path.name.startswith("guest-smc-")
    assert (0xD400_0003).to_bytes(4, "little") in path.read_bytes()  # smc #0
    # found again without an assembler: the cache is all a host without binutils needs
    monkeypatch.setenv(payload.CROSS_ENV, str(tmp_path / "no-such-"))
    assert cache.build(sources / "guest.S", conduit="smc") == (path, False)
    # where the project lies is no part of the key (the emulated host has the checkout elsewhere)
    moved = shutil.copytree(sources, tmp_path / "elsewhere" / "proj")
    assert cache.path_for(moved / "guest.S", conduit="smc") == path
    names = {cache.path_for(sources / "guest.S", conduit=c, defsyms=d).name
             for c, d in (("smc", None), ("hvc", None), ("smc", {"EXTRA": 1}), ("smc", {"EXTRA": 2}))}
    assert len(names) == 4
    (moved / "values.inc").write_text("    .equ VALUE, 6\n")  # an included file's bytes count
    assert cache.path_for(moved / "guest.S", conduit="smc") != path


def test_a_cache_named_relative_to_the_current_directory_builds(sources: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """As `make payloads` names it: the assembler runs in the source's directory, so every path
    it is given must not depend on where pyvmm was started."""
    monkeypatch.chdir(tmp_path)
    path, made = payload.PayloadCache("rel/cache").build(Path("proj") / "guest.S")
    assert made and path.is_file() and path.resolve().parent == tmp_path / "rel" / "cache"


def test_a_c_preprocessor_line_is_refused_not_dropped(sources: Path, tmp_path: Path) -> None:
    (sources / "cpp.S").write_text('#include "values.inc"\n' + GUEST)
    with pytest.raises(payload.PayloadError, match=r"cpp.S:1: a C preprocessor line"):
        payload.PayloadCache(tmp_path / "cache").build(sources / "cpp.S")


def test_without_an_assembler_the_error_gives_the_command_that_builds_it(sources: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # the message shows paths outside the current directory as they are
    cache = payload.PayloadCache(tmp_path / "cache")
    monkeypatch.setenv(payload.CROSS_ENV, str(tmp_path / "no-such-"))
    with pytest.raises(payload.PayloadError) as e:
        cache.build(sources / "guest.S", conduit="smc", defsyms={"ROUNDS": 3})
    message = str(e.value)
    assert "\n" not in message
    tools = f"{tmp_path}/no-such-as, {tmp_path}/no-such-ld and {tmp_path}/no-such-objcopy"
    assert f"cannot assemble {sources / 'guest.S'}: {tools} not found on this host, and the payload cache " \
           f"{tmp_path / 'cache'} has no build of it for smc" in message
    command = message.split(" with: ", 1)[1]
    assert command == (f"python3 -m pyvmm.testing.payload build --cache {tmp_path / 'cache'} --conduit smc "
                       f"--defsym ROUNDS=3 {sources / 'guest.S'}")
    # that command, where the assembler is, makes exactly the build that was missing
    monkeypatch.delenv(payload.CROSS_ENV)
    argv = [sys.executable, *shlex.split(command)[1:]]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0 and p.stdout.startswith(f"{sources / 'guest.S'} (smc): {tmp_path / 'cache'}"), p.stderr
    monkeypatch.setenv(payload.CROSS_ENV, str(tmp_path / "no-such-"))
    path, made = cache.build(sources / "guest.S", conduit="smc", defsyms={"ROUNDS": 3})
    assert not made and path.is_file()


def test_an_assembler_error_is_the_assembler_s_message(sources: Path, tmp_path: Path) -> None:
    (sources / "bad.S").write_text("    .include \"pyvmm.inc\"\n    no_such_instruction x0\n")
    with pytest.raises(payload.PayloadError, match=r"as failed on .*bad\.S \(hvc\): .*bad\.S:2: Error: "):
        payload.PayloadCache(tmp_path / "cache").build(sources / "bad.S")
    with pytest.raises(payload.PayloadError, match="--defsym 'SMC' is set by the conduit"):
        payload.PayloadCache(tmp_path / "cache").build(sources / "guest.S", defsyms={"SMC": 1})


def test_an_assembler_s_many_messages_are_cut_to_the_first_few(sources: Path, tmp_path: Path) -> None:
    """A source for the wrong architecture fails on every line: the message stays readable."""
    (sources / "wrong.S").write_text("".join(f"    no_such_instruction_{n} x0\n" for n in range(30)))
    with pytest.raises(payload.PayloadError) as e:
        payload.PayloadCache(tmp_path / "cache").build(sources / "wrong.S")
    message = str(e.value)
    # the first line is "Assembler messages:", then errors
    assert "\n" not in message and message.count(": Error: ") == payload.TOOL_LINES_SHOWN - 1
    assert re.search(r"\.\.\. and \d+ more lines$", message), message


def test_each_build_has_an_elf_file_with_symbols_at_the_load_address(sources: Path, tmp_path: Path) -> None:
    """For GDB: the ELF beside the flat binary is linked where pyvmm loads the payload."""
    path, _ = payload.PayloadCache(tmp_path / "cache").build(sources / "guest.S")
    elf = path.with_suffix(".elf")
    assert elf.read_bytes()[:4] == b"\x7fELF"
    nm = subprocess.run([f"{payload.cross_prefix()}nm", str(elf)], capture_output=True, text=True, check=True)
    assert f"{payload.LOAD_ADDRESS:016x} T _start" in nm.stdout.splitlines()


def test_an_aarch32_payload_is_built_by_binutils_for_arm_on_pyvmm32_inc(tmp_path: Path) -> None:
    source = tmp_path / "a32.S"
    source.write_text('    .include "pyvmm32.inc"\n    .text\n    .global _start\n_start:\n    report\n')
    cache = payload.PayloadCache(tmp_path / "cache")
    path, made = cache.build(source, conduit="smc", arch="aarch32")
    assert made and path.name.startswith("a32-aarch32-smc-")
    code = path.read_bytes()
    assert (0xE160_0070).to_bytes(4, "little") == code[-4:]  # A32 smc #0, after movw/movt r0
    assert cache.path_for(source, conduit="smc") != path  # the architecture is part of the key
    with pytest.raises(payload.PayloadError, match="the architecture is 'aarch64' or 'aarch32', not 'x86'"):
        cache.build(source, arch="x86")


def test_the_command_line_copies_a_build_and_its_elf_out(sources: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "guest.bin"
    argv = ["build", "--cache", str(tmp_path / "cache"), "--conduit", "hvc", "-o", str(out), str(sources / "guest.S")]
    assert payload.main(argv) == 0
    built, _ = payload.PayloadCache(tmp_path / "cache").build(sources / "guest.S")
    assert out.read_bytes() == built.read_bytes()
    assert out.with_suffix(".elf").read_bytes() == built.with_suffix(".elf").read_bytes()


def test_the_command_line_takes_minus_o_for_one_build_only(sources: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        payload.main(["build", "--cache", str(tmp_path), "-o", str(tmp_path / "x.bin"), str(sources / "guest.S")])
    assert e.value.code == 2 and "-o takes one FILE and one --conduit" in capsys.readouterr().err


def test_the_plugin_s_cache_without_an_assembler_as_a_user_sees_it(run: Callable[..., pytest.RunResult],
                                                                   pytester: pytest.Pytester,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   sources: Path) -> None:
    shutil.copy(sources / "guest.S", pytester.path)
    shutil.copy(sources / "values.inc", pytester.path)
    pytester.makepyfile(test_build="""
        def test_build(pyvmm_payloads, pytestconfig):
            path = pyvmm_payloads.build("guest.S", conduit="smc")
            assert path.parent == pytestconfig.rootpath / "build" / "pyvmm-payloads"
    """)
    monkeypatch.setenv(payload.CROSS_ENV, "/nonexistent/")
    result = run()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["pyvmm: cannot assemble guest.S: /nonexistent/as, /nonexistent/ld and "
                                 "/nonexistent/objcopy not found on this host, and the payload cache "
                                 "build/pyvmm-payloads has no build of it for smc (guest-smc-*.bin); *"
                                 "with: python3 -m pyvmm.testing.payload build --cache build/pyvmm-payloads --conduit smc "
                                 "guest.S"])
    # pre-built, as `make kvm` does for the emulated host: the run finds it in the cache
    monkeypatch.delenv(payload.CROSS_ENV)
    assert payload.main(["build", "--cache", "build/pyvmm-payloads", "guest.S"]) == 0
    monkeypatch.setenv(payload.CROSS_ENV, "/nonexistent/")
    run().assert_outcomes(passed=1)


def test_the_cache_directory_comes_from_the_environment_then_the_ini(run: Callable[..., pytest.RunResult],
                                                                     pytester: pytest.Pytester,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     sources: Path, tmp_path: Path) -> None:
    shutil.copy(sources / "guest.S", pytester.path)
    (pytester.path / "incs").mkdir()
    shutil.copy(sources / "values.inc", pytester.path / "incs")  # found only through pyvmm_include_dirs
    pytester.makeini("[pytest]\npyvmm_payload_cache = cache-here\npyvmm_include_dirs = incs\n")
    pytester.makepyfile(test_build="""
        import os

        def test_build(pyvmm_payloads):
            print("BUILT", pyvmm_payloads.build("guest.S"))
    """)
    run("-s").stdout.fnmatch_lines([f"*BUILT {pytester.path / 'cache-here'}/guest-hvc-*.bin*"])
    monkeypatch.setenv(payload.CACHE_ENV, str(tmp_path / "from-env"))
    run("-s").stdout.fnmatch_lines([f"*BUILT {tmp_path / 'from-env'}/guest-hvc-*.bin*"])


def test_without_the_smccc_filter_payloads_run_and_an_unavailable_trace_says_so(
        run: Callable[..., pytest.RunResult], pytester: pytest.Pytester, fake_vm: type[FakeVm],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """On Linux < 6.4 (KVM forwards nothing) run_payload leaves the report service out by default
    and the trace cannot be read: an empty one would let "no SYSTEM_RESET" pass unexamined."""
    monkeypatch.setattr(FakeVm, "has_smccc_filter", False)
    monkeypatch.setattr(FakeVm, "script", [(0, 0x8400_0008, {}, 0)])  # SYSTEM_OFF
    pytester.makepyfile(test_old_kernel="""
        import pytest
        from pyvmm.errors import SmcccFilterUnavailableError

        def test_a_payload_runs(run_payload):
            run = run_payload(bytes.fromhex("00000014"))
            assert run.vm.options["psci"] is False and run.vm.smccc.services == []
            assert run.reports == []
            with pytest.raises(SmcccFilterUnavailableError, match="the SMCCC trace .* needs KVM's SMCCC filter"):
                run.trace.calls
            with pytest.raises(SmcccFilterUnavailableError):
                len(run.trace)
    """)
    run().assert_outcomes(passed=1)

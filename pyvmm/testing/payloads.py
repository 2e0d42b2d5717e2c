"""`payload_vm` and `run_payload`: a guest payload (assembled from .S, or a flat binary) on a fresh VM."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, cast

import pytest

from pyvmm.testing.hooks import require_kvm
from pyvmm.testing.options import in_project, ini_base, seconds, time_limit
from pyvmm.testing.reports import Report, add_services, report_service
from pyvmm.testing.trace import SmcccTrace

if TYPE_CHECKING:
    from pyvmm.machine.cpu_features import CpuOptions
    from pyvmm.machine.lifecycle import RunResult
    from pyvmm.machine.vm import Vm
    from pyvmm.testing.payload import PayloadCache
    from pyvmm.testing.reports import ServiceSpec


REPORT_SECTION_LINES = 200  # of a run's trace, shown with a failing test


def payload_cache(config: pytest.Config) -> PayloadCache:
    from pyvmm.testing.payload import CACHE_ENV, PayloadCache

    env = os.environ.get(CACHE_ENV)
    ini = str(config.getini("pyvmm_payload_cache")).strip()
    if env:
        directory = Path(env).resolve()
    elif ini:
        directory = ini_base(config) / ini
    else:
        directory = config.rootpath / "build" / "pyvmm-payloads"
    return PayloadCache(directory, cast(list[Path], config.getini("pyvmm_include_dirs")))


class Payloads:
    """The `pyvmm_payloads` fixture: `.S` sources assembled through the payload cache."""

    def __init__(self, config: pytest.Config) -> None:
        self._config = config
        self.cache = payload_cache(config)

    def build(self, source: str | os.PathLike[str], *, conduit: str = "hvc",
              defsyms: Mapping[str, int] | None = None, arch: str = "aarch64") -> Path:
        """The flat binary of `source` (relative: to the rootdir) whose firmware calls use `conduit`,
        for `arch` ("aarch32": an AArch32 payload); its ELF file is beside it, with `.elf`.
        A source that cannot be assembled fails the test with the reason (the assembler's
        messages, or the command that pre-builds it where binutils are)."""
        from pyvmm.testing.payload import PayloadError

        try:
            path, _ = self.cache.build(in_project(self._config, source), conduit=conduit, defsyms=defsyms, arch=arch)
        except PayloadError as e:
            pytest.fail(f"pyvmm: {e}", pytrace=False)
        return path


# --- payload_vm and run_payload ----------------------------------------------------------------
class PayloadRun:
    """A payload on a VM of its own: payload_vm() gives it ready to start, run_payload() after
    run(). The VM stays open until the test ends, so its services' state can be inspected."""

    def __init__(self, vm: Vm, binary: Path | None, trace: SmcccTrace, reports: list[Report],
                 listeners: list[Callable[[Report], None]], console: bytearray, item: pytest.Item,
                 label: str) -> None:
        self.vm = vm
        self.binary = binary  # the payload that runs (None: given as bytes); its ELF: .with_suffix(".elf")
        self.trace = trace
        self.reports = reports  # FN_REPORT calls, in the order they were answered (filled as they come)
        self._listeners = listeners
        self._console = console
        self._item = item
        self._label = label
        self._result: RunResult | None = None

    def run(self, timeout: float | None = None) -> PayloadRun:
        """Run the guest until it powers off, fails, or `timeout` (default: the test's limit)
        passes; the run's trace and console are shown with the test's failure."""
        limit = seconds(timeout, "timeout=") if timeout is not None else time_limit(self._item)
        self._result = result = self.vm.run(limit)
        lines = [] if self.trace.off else self.trace.text().splitlines()
        if len(lines) > REPORT_SECTION_LINES:
            lines = [f"... the first {len(lines) - REPORT_SECTION_LINES} of {len(lines)} lines left out",
                     *lines[-REPORT_SECTION_LINES:]]
        console_text = self.console[-4096:].decode(errors="replace")
        self._item.add_report_section("call", self._label, "\n".join([f"ended: {result}", *lines])
                                      + (f"\nconsole (its end):\n{console_text}" if console_text else ""))
        return self

    def on_report(self, listener: Callable[[Report], None]) -> None:
        """Call listener(report) as each report comes, on the reporting vCPU's thread, before
        the guest goes on: a test acts at a point the guest chose (raises an SDEI event, ...)."""
        self._listeners.append(listener)

    @property
    def result(self) -> RunResult:
        """Why the last run ended: result.reason is "poweroff" after SYSTEM_OFF."""
        if self._result is None:
            raise RuntimeError("this payload has not run yet: call run()")
        return self._result

    @property
    def console(self) -> bytes:
        """What the guest wrote to the UART so far."""
        return bytes(self._console)

    @property
    def reason(self) -> str:
        return self.result.reason

    @property
    def values(self) -> list[tuple[int, ...]]:
        """Each report's x1..x6."""
        return [r.values for r in self.reports]

    def tagged(self, tag: int) -> list[tuple[int, ...]]:
        """The x2..x6 of the reports whose x1 is `tag`."""
        return [r.values[1:] for r in list(self.reports) if r.values[0] == tag]


class PayloadVms:
    """The VMs of one test's payloads: made by `make`, closed by `close` when the test ends."""

    def __init__(self, item: pytest.Item) -> None:
        self._item = item
        self._vms: list[Vm] = []
        self._payloads: Payloads | None = None

    def make(self, payload: str | os.PathLike[str] | bytes, *, services: Iterable[ServiceSpec] = (),
             conduit: str = "hvc", cpus: int = 1, mem_mib: int = 16, defsyms: Mapping[str, int] | None = None,
             psci: bool | None = None, reports: bool | None = None, trace: bool = True,
             unhandled_mmio: str = "ignore", aarch32: bool = False, cpu: CpuOptions | None = None,
             irqchip: str = "auto") -> PayloadRun:
        """A VM with `payload` loaded and entered at the start of RAM, not yet started (see
        the `payload_vm` fixture)."""
        require_kvm(self._item)
        from pyvmm.errors import VmmError
        from pyvmm.machine.cpu_features import AS_THE_HOST_OFFERS
        from pyvmm.machine.vm import Vm

        binary = None if isinstance(payload, bytes) else self._binary(payload, conduit, defsyms, aarch32)
        console = bytearray()
        got: list[Report] = []
        listeners: list[Callable[[Report], None]] = []
        calls = SmcccTrace()
        try:
            vm = Vm(cpus=cpus, mem_mib=mem_mib, conduit=conduit, psci=psci, console=console.append,
                    unhandled_mmio=unhandled_mmio, aarch32=aarch32, cpu=cpu or AS_THE_HOST_OFFERS, irqchip=irqchip)
            self._vms.append(vm)
            if reports is None:
                reports = vm.has_smccc_filter  # without the filter nothing can be forwarded
            if reports:
                vm.smccc.add_service(report_service(got, listeners, aarch32))
            add_services(vm.smccc, vm.service_context, services, self._item.config.rootpath)
            if trace:
                calls.attach(vm)
            else:
                calls.off = True  # the dispatcher's fast path, as `pyvmm run` without --trace
            entry = vm.load(payload) if isinstance(payload, bytes) else vm.load_file(cast(Path, binary))
            vm.set_boot(entry)
        except VmmError as e:  # a service module that does not load, a payload too big for RAM, ...
            pytest.fail(f"pyvmm: {e}", pytrace=False)
        what = f"{len(payload)} bytes" if isinstance(payload, bytes) else cast(Path, binary).name
        label = f"pyvmm run {len(self._vms)} ({what}, {conduit}, {cpus} vCPUs)"
        return PayloadRun(vm, binary, calls, got, listeners, console, self._item, label)

    def _binary(self, payload: str | os.PathLike[str], conduit: str, defsyms: Mapping[str, int] | None,
                aarch32: bool) -> Path:
        path = in_project(self._item.config, payload)
        if path.suffix in (".S", ".s"):
            if self._payloads is None:
                self._payloads = Payloads(self._item.config)
            return self._payloads.build(path, conduit=conduit, defsyms=defsyms,
                                        arch="aarch32" if aarch32 else "aarch64")
        if defsyms:
            raise ValueError(f"defsyms are for a payload assembled here, not the binary {path}")
        return path

    def close(self) -> None:
        for vm in self._vms:
            vm.close()
        self._vms.clear()


class MakePayloadVm:
    """The `payload_vm` fixture: payload_vm(payload, ...) -> a PayloadRun not yet started."""

    def __init__(self, vms: PayloadVms) -> None:
        self._vms = vms

    def __call__(self, payload: str | os.PathLike[str] | bytes, *, services: Iterable[ServiceSpec] = (),
                 conduit: str = "hvc", cpus: int = 1, mem_mib: int = 16, defsyms: Mapping[str, int] | None = None,
                 psci: bool | None = None, reports: bool | None = None, trace: bool = True,
                 unhandled_mmio: str = "ignore", aarch32: bool = False, cpu: CpuOptions | None = None,
                 irqchip: str = "auto") -> PayloadRun:
        """`payload` on a fresh VM, loaded but not started: the test sets the VM up through
        .vm (services, registers, devices, threads of its own), then calls .run() or vm.run().
        The arguments are run_payload's but configure= and timeout= (.run() takes that), and
        the VM's: `aarch32` (an AArch32 payload: built with binutils for arm, pyvmm32.inc),
        `cpu` (CpuOptions), `irqchip`."""
        return self._vms.make(payload, services=services, conduit=conduit, cpus=cpus, mem_mib=mem_mib,
                              defsyms=defsyms, psci=psci, reports=reports, trace=trace,
                              unhandled_mmio=unhandled_mmio, aarch32=aarch32, cpu=cpu, irqchip=irqchip)


class RunPayload:
    """The `run_payload` fixture: run_payload(payload, ...) -> PayloadRun, on a fresh VM."""

    def __init__(self, vms: PayloadVms) -> None:
        self._vms = vms

    def __call__(self, payload: str | os.PathLike[str] | bytes, *, services: Iterable[ServiceSpec] = (),
                 conduit: str = "hvc", cpus: int = 1, mem_mib: int = 16, defsyms: Mapping[str, int] | None = None,
                 psci: bool | None = None, reports: bool | None = None, trace: bool = True,
                 configure: Callable[[Vm], None] | None = None, timeout: float | None = None,
                 unhandled_mmio: str = "ignore") -> PayloadRun:
        """Run `payload` until it powers off, fails, or `timeout` (default: the test's limit)
        passes. `payload`: a `.S`/`.s` file (assembled for `conduit`, with `defsyms`), a flat
        binary file, or its bytes, loaded and entered at the start of RAM. `services` are added
        to PSCI (`psci=False`: KVM's own PSCI answers; the default: pyvmm's where the host has
        the SMCCC filter, see Vm) and, with `reports`, the FN_REPORT service; `configure(vm)`
        runs last, before the guest does (vm.enable_sdei(), ...). Without the SMCCC filter
        (Linux < 6.4) services cannot be had: `reports` (default: where the filter is) is then
        off, and reading the trace raises SmcccFilterUnavailableError instead of finding it empty.
        `trace=False` leaves the SMCCC trace off: calls take the dispatcher's fast path, as under
        `pyvmm run` without --trace, and reading the trace raises."""
        run = self._vms.make(payload, services=services, conduit=conduit, cpus=cpus, mem_mib=mem_mib,
                             defsyms=defsyms, psci=psci, reports=reports, trace=trace,
                             unhandled_mmio=unhandled_mmio)
        if configure is not None:
            configure(run.vm)  # the test's own code: its errors keep their tracebacks
        return run.run(timeout)

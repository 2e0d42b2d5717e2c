"""`run_payload`: a guest payload (assembled from .S, or a flat binary) on a fresh VM."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import pytest

from pyvmm.testing.hooks import require_kvm
from pyvmm.testing.options import in_project, ini_base, seconds, time_limit
from pyvmm.testing.reports import Report, add_services, report_service
from pyvmm.testing.trace import SmcccTrace

if TYPE_CHECKING:
    from pyvmm.machine.lifecycle import RunResult
    from pyvmm.machine.vm import Vm
    from pyvmm.services.modules import ServiceModule
    from pyvmm.smccc.context import ServiceContext
    from pyvmm.smccc.service import Service
    from pyvmm.testing.payload import PayloadCache

    # A service for a guest: a service module file (RANGE, handle, NAME: what `pyvmm run
    # --service` loads), a loaded ServiceModule, a Service, or a callable that makes one from
    # the VM's ServiceContext (a Service class such as pyvmm.services.sdei.Sdei is one).
    ServiceSpec = str | os.PathLike[str] | ServiceModule | Service | Callable[[ServiceContext], Service]


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
              defsyms: Mapping[str, int] | None = None) -> Path:
        """The flat binary of `source` (relative: to the rootdir) whose firmware calls use `conduit`.
        A source that cannot be assembled fails the test with the reason (the assembler's
        messages, or the command that pre-builds it where binutils are)."""
        from pyvmm.testing.payload import PayloadError

        try:
            path, _ = self.cache.build(in_project(self._config, source), conduit=conduit, defsyms=defsyms)
        except PayloadError as e:
            pytest.fail(f"pyvmm: {e}", pytrace=False)
        return path


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
            path = in_project(config, payload)
            if path.suffix in (".S", ".s"):
                if self._payloads is None:
                    self._payloads = Payloads(config)
                binary = self._payloads.build(path, conduit=conduit, defsyms=defsyms)
            elif defsyms:
                raise ValueError(f"defsyms are for a payload assembled here, not the binary {path}")
            else:
                binary = path
        limit = seconds(timeout, "timeout=") if timeout is not None else time_limit(self._item)
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



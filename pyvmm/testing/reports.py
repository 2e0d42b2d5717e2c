"""Services for a guest under test, and FN_REPORT: what the guest reports (pyvmm.inc's convention)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyvmm.services.modules import ServiceModule
    from pyvmm.smccc.context import ServiceContext
    from pyvmm.smccc.dispatcher import Dispatcher
    from pyvmm.smccc.service import Service

    # A service for a guest: a service module file (RANGE, handle, NAME: what `pyvmm run
    # --service` loads), a loaded ServiceModule, a Service, or a callable that makes one from
    # the VM's ServiceContext (a Service class such as pyvmm.services.sdei.Sdei is one).
    ServiceSpec = str | os.PathLike[str] | ServiceModule | Service | Callable[[ServiceContext], Service]


FN_REPORT = 0xC200_00F0  # pyvmm.inc's FN_REPORT: x1..x6 are the guest's report
FN_REPORT32 = 0x8200_00F0  # pyvmm32.inc's, for AArch32 guests (they have no SMC64): r1..r6
REPORT_ARGS = ("x1", "x2", "x3", "x4", "x5", "x6")


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


def report_service(reports: list[Report], listeners: Iterable[Callable[[Report], None]] = (),
                   aarch32: bool = False) -> Service:
    """The service answering FN_REPORT (FN_REPORT32 for `aarch32` guests, which have no SMC64):
    each call's x1..x6 appended to `reports`, then given to each of `listeners` (read as each
    call comes: a list may grow), on the reporting vCPU's thread before the guest goes on;
    x0 = 0. An AArch64 guest's SiP SMC32 range stays its services' own."""
    fid, name = (FN_REPORT32, "REPORT32") if aarch32 else (FN_REPORT, "REPORT")
    from pyvmm.smccc.call import SmcccCall
    from pyvmm.smccc.service import Function, Results, Service

    lock = threading.Lock()  # vCPU threads report concurrently

    class ReportService(Service):
        name = "pyvmm test reports"
        ranges = ((fid, 1),)

        def functions(self) -> dict[int, Function]:
            return {fid: Function(name, self.report, REPORT_ARGS)}

        def report(self, call: SmcccCall) -> Results:
            report = Report(call.vcpu.index, call.args(6))
            with lock:
                reports.append(report)
            for listener in listeners:
                listener(report)
            return 0

    return ReportService()



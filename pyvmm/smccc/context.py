"""What an SMCCC service is handed: the narrow view of the machine a firmware interface needs.

A service never sees the VM. It gets the vCPUs (registers, power control, their threads), a
bounds check on guest RAM, the system's power controls (SYSTEM_OFF, SYSTEM_RESET), the conduit,
a way to put lines in the trace and, for SDEI, the interrupt lines it may bind. Unit tests hand
services the same context built around fake vCPUs (tests/unit/fakes.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

from pyvmm.machine.power import Entry, Power


class TraceEvent(NamedTuple):
    """Something a service did to a vCPU outside a call's results (an SDEI dispatch)."""

    vcpu: int
    source: str
    text: str


class ServiceVcpu(Protocol):
    """A vCPU as services see it (pyvmm.machine.vcpu.Vcpu is one)."""

    index: int
    mpidr: int
    def set_x0(self, value: int) -> None:
        """x0 <- a call's result (64 bits), in one ioctl: the hot path of every forwarded call."""

    def get_x(self, n: int) -> int: ...

    def set_x(self, n: int, value: int) -> None: ...

    def get_one_reg(self, reg_id: int) -> int: ...

    def set_one_reg(self, reg_id: int, value: int) -> None: ...

    @property
    def power(self) -> Power: ...

    @property
    def guest_power(self) -> Power: ...

    def request_on(self, entry: Entry) -> Power | None: ...

    def power_off(self) -> None: ...

    def suspend(self, resume_at: Entry | None) -> None: ...

    @property
    def powered_down(self) -> bool: ...

    def leave_standby(self) -> bool: ...

    def leave_guest(self) -> None: ...

    def on_own_thread(self) -> bool: ...

    def request(self, fn: Callable[[Any], None]) -> None: ...

    def defer(self, fn: Callable[[Any], None]) -> None: ...


class GuestRam(Protocol):
    def contains(self, gpa: int, size: int = 1) -> bool: ...


class SystemControl(Protocol):
    """The machine's power, for SYSTEM_OFF and SYSTEM_RESET (called on the caller's vCPU thread)."""

    def power_off_system(self, vcpu: ServiceVcpu, message: str) -> None: ...

    def request_reset(self, vcpu: ServiceVcpu, message: str) -> None: ...


class BindableLines(Protocol):
    """The interrupt lines an SDEI client may bind (pyvmm.machine.irq_lines.InterruptLines is one)."""

    def intercept(self, interceptor: Callable[[int, bool], bool]) -> None: ...

    def to_gic(self, intid: int, level: bool) -> None: ...

    def is_irqfd(self, intid: int) -> bool: ...


class ServiceContext(NamedTuple):
    vcpus: Sequence[ServiceVcpu]
    memory: GuestRam
    system: SystemControl
    conduit: str  # "hvc" or "smc": what the device-tree nodes of firmware services advertise
    trace: Callable[[TraceEvent], None]  # a line in the SMCCC trace (dropped while tracing is off)
    lines: BindableLines

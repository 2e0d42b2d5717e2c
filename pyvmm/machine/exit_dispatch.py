"""What the machine does with each exit a vCPU's loop hands it: forwarded SMCCC calls to the
dispatcher, MMIO to the device on the bus, system events to the life cycle, the rest as errors
a user can read."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Sequence
from typing import Protocol

from kvm_bindings.constants import SystemEvent
from pyvmm.devices.bus import MmioBus
from pyvmm.errors import GuestError, VmmError
from pyvmm.kvm.exits import (
    DebugExit,
    Exit,
    FailEntryExit,
    InternalErrorExit,
    InterruptedExit,
    MmioExit,
    NisvExit,
    SystemEventExit,
    complete_mmio_read,
)
from pyvmm.machine.lifecycle import Lifecycle, RunResult
from pyvmm.machine.power import Power
from pyvmm.machine.vcpu import Vcpu
from pyvmm.smccc.dispatcher import Dispatcher

log = logging.getLogger("pyvmm")

SYSTEM_EVENTS: dict[int, str] = {SystemEvent.SHUTDOWN: "poweroff", SystemEvent.RESET: "reset", SystemEvent.CRASH: "crash",
                 SystemEvent.SUSPEND: "suspend"}


class UnhandledMmio:
    """Accesses to guest-physical addresses with neither RAM nor a device behind them.

    policy "ignore": loads read as zero, stores are dropped (kvmtool's choice), the first 256 are
    kept in `accesses` and logged; "stop": the run ends with an error naming the access.
    """

    def __init__(self, policy: str) -> None:
        if policy not in ("ignore", "stop"):
            raise VmmError(f"unhandled MMIO policy is 'ignore' or 'stop', not {policy!r}")
        self.policy = policy
        self.accesses: list[MmioExit] = []


class DebugEvents(Protocol):
    """A debugger's part in the exit loop (pyvmm.gdb.debugger.Debugger)."""

    def debug_exit(self, vcpu: Vcpu, ex: DebugExit) -> None: ...

    def booted(self, vcpu: Vcpu) -> None: ...


class MachineExits:
    def __init__(self, smccc: Dispatcher, bus: MmioBus, unhandled: UnhandledMmio, lifecycle: Lifecycle,
                 vcpus: Sequence[Vcpu] = ()) -> None:
        self._smccc, self._bus, self._unhandled, self._lifecycle = smccc, bus, unhandled, lifecycle
        self.hypercall = smccc.answer  # the hot path: no frame of our own
        self.hot_reads = bus.hot_reads  # MMIO's hot path (devices/bus.py), read by the vCPU loop
        self.vcpus = vcpus
        self.debugger: DebugEvents | None = None

    def mmio(self, vcpu: Vcpu, ex: MmioExit) -> None:
        m = self._bus.find(ex.addr, ex.size)
        if m is not None:
            off = ex.addr - m.base
            if ex.is_write:
                m.device.write(off, ex.size, ex.data)
            else:
                complete_mmio_read(vcpu.kvm_run, m.device.read(off, ex.size), ex.size)
            return
        access = f"{'write' if ex.is_write else 'read'} of {ex.size} bytes at {ex.addr:#x}"
        if self._unhandled.policy == "stop":
            raise GuestError(f"guest {access}: no RAM or device there")
        if len(self._unhandled.accesses) < 256:
            self._unhandled.accesses.append(ex)
            log.warning("vcpu%d: %s hits no RAM or device (reads as 0, writes ignored)", vcpu.index, access)
        if not ex.is_write:
            complete_mmio_read(vcpu.kvm_run, 0, ex.size)

    def system_event(self, vcpu: Vcpu, ex: SystemEventExit) -> bool:
        """KVM's own PSCI (psci=False) answered SYSTEM_OFF or SYSTEM_RESET, or the guest crashed
        (api.rst, KVM_EXIT_SYSTEM_EVENT): the machine powers off, restarts as for pyvmm's own
        SYSTEM_RESET, or the run ends. False: this vCPU's thread ends."""
        message = f"guest system event {ex.name} (KVM's PSCI)"
        if ex.type == SystemEvent.SHUTDOWN:
            self._lifecycle.power_off_system(vcpu, message)
        elif ex.type == SystemEvent.RESET:
            self._lifecycle.request_reset(vcpu, message)
        else:
            reason = SYSTEM_EVENTS.get(ex.type, ex.name)  # IntEnum keys match the raw type number
            self._lifecycle.finish(RunResult(reason, f"guest system event {ex.name}", vcpu.index, ex.data))
        return False

    def debug(self, vcpu: Vcpu, ex: DebugExit) -> None:
        """KVM_EXIT_DEBUG: only a debugger enables guest debug, and it takes the event."""
        if self.debugger is None:
            raise GuestError(f"KVM reported a debug event ({ex.kind}, ESR {ex.esr:#x}) with no debugger attached")
        self.debugger.debug_exit(vcpu, ex)

    def other(self, vcpu: Vcpu, ex: Exit) -> None:
        if isinstance(ex, InterruptedExit):
            return
        if isinstance(ex, NisvExit):
            pc = vcpu.get_reg("pc")
            raise GuestError(f"guest access at {ex.fault_ipa:#x} (PC {pc:#x}) is to no RAM or device and KVM "
                             f"cannot decode it (no valid ISV, ESR ISS {ex.esr_iss:#x})")
        if isinstance(ex, FailEntryExit):
            raise GuestError(f"KVM could not enter the guest (hardware reason {ex.reason:#x})")
        if isinstance(ex, InternalErrorExit):
            raise GuestError(f"KVM internal error {ex.suberror} {ex.data}")
        raise GuestError(f"unhandled KVM exit {ex}")

    def booting(self, vcpu: Vcpu) -> None:
        """A CPU_ON'd vCPU has been reset to its entry point and is about to run."""
        self._smccc.power_on(vcpu)  # services' per-PE state starts over (SDEI)
        if self.debugger is not None:
            self.debugger.booted(vcpu)  # KVM_ARM_VCPU_INIT reset it: its guest debug is set again

    def woken(self, vcpu: Vcpu) -> None:
        self._smccc.woken(vcpu)
        if self.debugger is not None:
            self.debugger.booted(vcpu)  # a wake-up from power-down re-initialised it

    def turned_off(self, vcpu: Vcpu) -> None:
        """A vCPU powered itself off: services hear of it; and with every vCPU off and none
        pending nothing can run again, so the run ends."""
        self._smccc.powered_off(vcpu)
        if all(v.power == Power.OFF for v in self.vcpus):
            self._lifecycle.finish(RunResult("halted", "every vCPU is off (PSCI CPU_OFF) and none can be woken"))

    def failed(self, vcpu: Vcpu, error: BaseException) -> None:
        """A vCPU thread ended with an exception: the run ends with its message."""
        if isinstance(error, VmmError):
            msg = str(error)
        else:
            msg = f"internal error: {type(error).__name__}: {error}"
            log.debug("vcpu%d failed:\n%s", vcpu.index, "".join(traceback.format_exception(error)))
        self._lifecycle.finish(RunResult("error", msg, vcpu.index))

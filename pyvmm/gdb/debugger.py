"""All-stop run control for a debugger: stopping and resuming every vCPU, breakpoints,
watchpoints, single steps, and stops at SMCCC calls.

Stopping. The debugger never touches a running vCPU: it asks each vCPU's thread to park (a
vcpu.request(), which kicks it out of KVM_RUN) and waits until every vCPU is parked or off. A
parked thread waits here, outside KVM_RUN, until it may run again; its registers and guest
memory can then be read and written from the debugger's thread. A vCPU that is off parks when
a CPU_ON boots it, if the guest is stopped by then.

Events. A vCPU that hits a breakpoint, a watchpoint or the end of a step (KVM_EXIT_DEBUG), or
makes an SMCCC call being caught (the dispatcher's watch hook), records a Stop, stops the others
and parks itself. The server reports one Stop per resume. At the next resume the others are
dropped, except stops at SMCCC calls: those vCPUs are held inside the call, so the next resume
reports them instead of running the guest. A dropped breakpoint or watchpoint stop comes again
by itself: KVM reports a BRK, a hardware breakpoint or a watchpoint before the instruction runs,
so the vCPU meets it again.

Guest debug (KVM_SET_GUEST_DEBUG, api.rst 4.56) is set by each vCPU on its own thread as it
leaves the park (so it is in force before it next enters the guest), after a CPU_ON boots it,
and for every vCPU after a reset, with the breakpoints and watchpoints (breakpoints.py). GDB
steps over a breakpoint itself (it removes it, steps, puts it back), as it does with every
remote target.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple, Protocol

from kvm_bindings.constants import (
    KVM_GUESTDBG_ENABLE,
    KVM_GUESTDBG_SINGLESTEP,
    KVM_GUESTDBG_USE_HW,
    KVM_GUESTDBG_USE_SW_BP,
)
from pyvmm.gdb.breakpoints import Breakpoints
from pyvmm.gdb.target import MachineTarget
from pyvmm.machine.power import Power

if TYPE_CHECKING:
    from pyvmm.kvm.exits import DebugExit
    from pyvmm.machine.lifecycle import RunResult

SIGINT, SIGTRAP = 2, 5
STOP_WAIT = 5.0  # seconds every vCPU gets to park before a stop is reported anyway
MAX_CATCHES = 256
WATCH_REASONS = {"write": "watch", "read": "rwatch", "access": "awatch"}


class Stop(NamedTuple):
    """Why the guest stopped, as a stop reply tells GDB."""

    cpu: int
    signal: int
    reason: str  # swbreak, hwbreak, watch, rwatch, awatch, step, smccc, interrupt, attach, trap
    address: int = 0  # a watchpoint's
    note: str = ""  # a line for the user, sent before the stop reply


class DebugVcpu(Protocol):
    """A vCPU as the debugger controls it (pyvmm.machine.vcpu.Vcpu is one)."""

    index: int
    thread: threading.Thread | None

    @property
    def power(self) -> Power: ...

    def request(self, fn: Callable[[DebugVcpu], None]) -> None: ...

    def on_own_thread(self) -> bool: ...

    def set_guest_debug(self, control: int, bcr: list[int], bvr: list[int], wcr: list[int],
                        wvr: list[int]) -> None: ...


class Debugger:
    name = "gdb stub"  # its part in the machine's life cycle (MachineDevice)

    def __init__(self, vcpus: Sequence[DebugVcpu], target: MachineTarget, *, hw_breakpoints: int,
                 hw_watchpoints: int, describe_call: Callable[[int, int], str] = lambda fid, flags: f"{fid:#010x}",
                 set_watch: Callable[[Callable[[DebugVcpu, int, int], None] | None], None] = lambda hook: None,
                 result: Callable[[], RunResult | None] = lambda: None) -> None:
        self._vcpus, self.target = vcpus, target
        self.layout = target.layout
        self.points = Breakpoints(target, hw_breakpoints, hw_watchpoints)
        self.hw_breakpoints, self.hw_watchpoints = self.points.hw_breakpoints, self.points.hw_watchpoints
        self._describe_call, self._set_watch, self._result = describe_call, set_watch, result
        self._cond = threading.Condition()
        self._running = True
        self._runnable: set[int] | None = None  # None: every vCPU may run
        self._stepping: set[int] = set()
        self._parked: set[int] = set()
        self._park_requested: set[int] = set()  # asked to park, not yet there: asked once, however many stops
        self._events: list[Stop] = []
        self._released = False  # the run is ending or resetting: nothing parks
        self.attached = False
        self.catches: list[tuple[int, int]] = []  # SMCCC function ID ranges, inclusive
        self.ended: RunResult | None = None
        self.wakeup = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)  # readable: a stop or the end

    # --- what the server asks (its own thread) -----------------------------------------------
    def hold(self) -> None:
        """Before the run: keep every vCPU from its first instruction until a debugger resumes it."""
        with self._cond:
            self._running = False
            self._events = [Stop(0, SIGTRAP, "attach")]
            for v in self._vcpus:
                self._request_park(v)

    def attach(self) -> None:
        """A client connected: the guest stops (if it runs), as QEMU's gdbstub stops it."""
        with self._cond:
            self.attached = True
            if self._running:
                self._add_event(Stop(0, SIGTRAP, "attach"))
            elif not self._events:
                self._events.append(Stop(0, SIGTRAP, "attach"))

    def interrupt(self) -> None:
        """Ctrl-C: every vCPU stops; the stop names the first one that is on."""
        with self._cond:
            if self._running:
                cpu = next((v.index for v in self._vcpus if v.power != Power.OFF), 0)
                self._add_event(Stop(cpu, SIGINT, "interrupt"))

    def take_stop(self) -> Stop | None:
        """The stop to report, once every vCPU has stopped; None while the guest runs."""
        with self._cond:
            if self._running or not self._events:
                return None
            deadline = time.monotonic() + STOP_WAIT
            while not self._all_stopped() and not self._released and time.monotonic() < deadline:
                self._cond.wait(0.05)  # a vCPU going off does not notify: look again soon
            stop = self._events.pop(0)
            self._stepping.discard(stop.cpu)
            late = [v.index for v in self._vcpus if not self._stopped(v)]
            if late and not self._released:  # in a handler that does not return: say so, not hang
                names = ", ".join(f"vCPU {i}" for i in late)
                warning = (f"{names} did not stop within {STOP_WAIT:g} s (busy outside the guest, in pyvmm or a "
                           "service); its registers may still change")
                stop = stop._replace(note="\n".join(n for n in (stop.note, warning) if n))
            return stop

    def resume_vcpus(self, step: set[int], run_others: bool, cpus: set[int] | None = None) -> None:
        """Let the guest run: `step` single-steps those vCPUs, `cpus` (None: all) continue, and
        with `run_others` every vCPU not named runs too. A stop that would not come again (a
        vCPU held at an SMCCC call) is reported first instead."""
        with self._cond:
            if self.ended is not None:
                self._poke()
                return
            self._events = [e for e in self._events if e.reason == "smccc"]
            if self._events:
                self._poke()
                return
            for cpu in step:
                if self._vcpus[cpu].power == Power.OFF:  # it cannot run: the step ends at once
                    self._events.append(Stop(cpu, SIGTRAP, "step", note=f"vCPU {cpu} is off: it did not step"))
            if self._events:
                self._poke()
                return
            named = step | (cpus or set())
            self._stepping = set(step)
            self._runnable = None if run_others or cpus is None and not step else named
            self._running = True
            self._cond.notify_all()

    def detach(self) -> None:
        """The client is gone: every breakpoint, watchpoint and catch is removed and the guest
        runs on as if no debugger had been there. A vCPU that is running (the client left during
        a continue) takes the plain guest debug at its next exit."""
        with self._cond:
            for v in self._vcpus:
                if v.index not in self._parked and v.power != Power.OFF:  # an off one applies it as it boots
                    v.request(self.booted)
            self.points.clear()
            self.set_catches([])
            self.attached = False
            self._events.clear()
            self._stepping.clear()
            self._runnable = None
            self._running = True
            self._cond.notify_all()

    # --- breakpoints and watchpoints (Z and z packets; the guest is stopped) -----------------
    # --- breakpoints and watchpoints (Z and z packets; the guest is stopped) -----------------
    def insert(self, kind: int, address: int, length: int, cpu: int) -> int:
        """Z<kind>: 0 on success, else an errno for the reply."""
        with self._cond:
            return self.points.insert(kind, address, length, cpu)

    def remove(self, kind: int, address: int, length: int) -> int:
        with self._cond:
            self.points.remove(kind, address, length)
            return 0

    def set_catches(self, ranges: list[tuple[int, int]]) -> None:
        """Stop a vCPU at each forwarded SMCCC call whose function ID is in `ranges` (at most
        MAX_CATCHES of them: ValueError)."""
        if len(ranges) > MAX_CATCHES:
            raise ValueError(f"at most {MAX_CATCHES} ranges are caught at once")
        self._set_watch(self._smccc_call if ranges else None)  # first: a host without the filter refuses it
        self.catches = list(ranges)

    # --- memory and registers as GDB sees them (the commands.Target protocol) ----------------
    def vcpus(self) -> int:
        return len(self._vcpus)

    def read_registers(self, cpu: int) -> list[int]:
        return self.target.read_registers(cpu)

    def write_register(self, cpu: int, number: int, value: int) -> None:
        self.target.write_register(cpu, number, value)

    def read_memory(self, cpu: int, address: int, length: int) -> bytes:
        return self.points.shown(address, self.target.read_memory(cpu, address, length))

    def write_memory(self, cpu: int, address: int, data: bytes) -> None:
        self.target.write_memory(cpu, address, data)
        self.points.written(address, data)

    # --- what the vCPUs report (their own threads) -------------------------------------------
    def debug_exit(self, vcpu: DebugVcpu, ex: DebugExit) -> None:
        """KVM_EXIT_DEBUG: record why, stop the guest, park until resumed. With no client (it
        left while this vCPU ran) the vCPU drops the guest debug and goes on: a BRK that was a
        breakpoint is gone from memory, so the instruction runs again as it was."""
        with self._cond:
            if self._released:
                return
            if not self.attached:
                self._apply(vcpu)
                return
            self._add_event(self._classify(vcpu.index, ex))
        self._park(vcpu)

    def _classify(self, cpu: int, ex: DebugExit) -> Stop:
        kind = ex.kind
        if kind == "step":
            return Stop(cpu, SIGTRAP, "step")
        if kind == "hw-breakpoint":
            return Stop(cpu, SIGTRAP, "hwbreak")
        if kind == "watchpoint":
            hit = self.points.watchpoint_at(ex.far)
            if hit is None:
                return Stop(cpu, SIGTRAP, "trap", note=f"vCPU {cpu}: a watchpoint at {ex.far:#x} that GDB did not set")
            return Stop(cpu, SIGTRAP, WATCH_REASONS[hit.kind], hit.address)
        if kind == "breakpoint":
            pc = self.target.read_pc(cpu)
            if pc in self.points.sw:
                return Stop(cpu, SIGTRAP, "swbreak")
            return Stop(cpu, SIGTRAP, "trap", note=f"vCPU {cpu} ran a BRK of its own at {pc:#x}")
        return Stop(cpu, SIGTRAP, "trap", note=f"vCPU {cpu}: a debug event KVM reports as ESR {ex.esr:#x}")

    def _smccc_call(self, vcpu: DebugVcpu, function_id: int, flags: int) -> None:
        """The dispatcher's watch hook: a caught call stops the guest before it is answered."""
        if not any(lo <= function_id <= hi for lo, hi in self.catches):
            return
        what = self._describe_call(function_id, flags)
        note = (f"vCPU {vcpu.index} stopped at SMCCC call {what}, before pyvmm answers it (x0-x17 hold the call; "
                "the PC is past the HVC/SMC; continue to have it answered)")
        with self._cond:
            if self._released or not self.attached:
                return
            self._add_event(Stop(vcpu.index, SIGTRAP, "smccc", note=note))
        self._park(vcpu)

    def booted(self, vcpu: DebugVcpu) -> None:
        """On `vcpu`'s thread, out of the guest: after a CPU_ON or a wake-up from power-down
        re-initialised it (KVM_ARM_VCPU_INIT), or when the client left, it takes the guest debug
        as it now is."""
        with self._cond:
            self._apply(vcpu)

    # --- parking -----------------------------------------------------------------------------
    def _add_event(self, stop: Stop) -> None:
        """(Lock held.) A stop: the first one stops every vCPU; the server hears of it."""
        self._events.append(stop)
        if self._running:
            self._running = False
            for v in self._vcpus:
                if v.index not in self._parked and not v.on_own_thread():
                    self._request_park(v)
        self._poke()

    def _request_park(self, v: DebugVcpu) -> None:
        """(Lock held.) Have `v` park at its next exit; a vCPU that is off keeps one request
        queued until it boots, never one per stop."""
        if v.index not in self._park_requested:
            self._park_requested.add(v.index)
            v.request(self._park)

    def _poke(self) -> None:
        os.eventfd_write(self.wakeup, 1)

    def _may_run(self, cpu: int) -> bool:
        return self._released or self._running and (self._runnable is None or cpu in self._runnable)

    def _park(self, vcpu: DebugVcpu) -> None:
        """On `vcpu`'s thread: wait while the guest is stopped, then take the guest debug."""
        with self._cond:
            self._park_requested.discard(vcpu.index)
            if self._may_run(vcpu.index):  # a request from an earlier stop, since resumed
                return
            self._parked.add(vcpu.index)
            self._cond.notify_all()
            while not self._may_run(vcpu.index):
                self._cond.wait()
            self._parked.discard(vcpu.index)
            if not self._released:
                self._apply(vcpu)

    def _stopped(self, v: DebugVcpu) -> bool:
        return v.index in self._parked or v.power == Power.OFF or v.thread is None or not v.thread.is_alive()

    def _all_stopped(self) -> bool:
        return all(self._stopped(v) for v in self._vcpus)

    def _control(self, cpu: int) -> int:
        if not self.attached and not self._stepping:
            return 0
        control = KVM_GUESTDBG_ENABLE
        if self.points.sw:
            control |= KVM_GUESTDBG_USE_SW_BP
        if self.points.hw or self.points.watchpoints:
            control |= KVM_GUESTDBG_USE_HW
        if cpu in self._stepping:
            control |= KVM_GUESTDBG_SINGLESTEP
        return control

    def _apply(self, vcpu: DebugVcpu) -> None:
        """(Lock held.) KVM_SET_GUEST_DEBUG for one vCPU that is not in the guest."""
        vcpu.set_guest_debug(self._control(vcpu.index), *self.points.registers())

    # --- the machine's life cycle (MachineDevice) --------------------------------------------
    def start(self) -> None:
        pass

    def release_waiters(self) -> None:
        """The vCPU threads are being stopped (the run ends, or the guest resets): none parks."""
        with self._cond:
            self._released = True
            self._cond.notify_all()

    def quiesce(self, deadline: float) -> bool:
        return True

    def reset(self) -> None:
        pass

    def resume(self) -> None:
        """After a reset: the images were loaded again (over the BRKs) and every vCPU was
        re-initialised; breakpoints and guest debug go back in, and a guest the debugger had
        stopped stays stopped."""
        with self._cond:
            self._released = False
            self.points.reinsert()
            self._park_requested.clear()  # the vCPU threads ended: their requests ran
            for v in self._vcpus:
                self._apply(v)
                if not self._running:
                    self._request_park(v)

    def stop(self, deadline: float) -> bool:
        return True

    def run_ended(self) -> None:
        """The run is over: a waiting client is told the guest exited."""
        with self._cond:
            self.ended = self._result()
            self._released = True
            self._cond.notify_all()
        self._poke()

    def close(self) -> None:
        os.close(self.wakeup)


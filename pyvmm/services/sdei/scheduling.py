"""Where SDEI events go and when (DEN0054B §6.2, §6.3): the registrations, which PE an event is
raised on, which of a PE's pending events is dispatched next, and dispatch and completion on the
vCPU's own thread. Sdei (service.py) is the SMCCC face of this machinery; its lock guards it."""

from __future__ import annotations

import logging
import threading

from pyvmm.machine.power import Power
from pyvmm.services.sdei.delivery import Frame, Pe, enter_handler, leave_handler
from pyvmm.services.sdei.events import (
    DENIED,
    ENABLED,
    MPIDR_AFF_MASK,
    PENDING,
    REGISTERED,
    RUNNING,
    SUCCESS,
    Action,
    EventSpec,
    Registration,
    transition,
)
from pyvmm.smccc.call import SmcccCall
from pyvmm.smccc.context import ServiceContext, ServiceVcpu, TraceEvent
from pyvmm.smccc.service import NO_RESULT, Results

log = logging.getLogger("pyvmm")


class EventScheduler:
    """The state Sdei's calls act on, and what moves it; the attributes are Sdei's (service.py)."""

    ctx: ServiceContext
    lock: threading.RLock
    specs: dict[int, EventSpec]
    shared: dict[int, Registration]
    bound: dict[int, Registration]
    pes: list[Pe]
    dispatches: int
    _lines: set[int]  # INTIDs of bound interrupts whose line is high

    # --- state -----------------------------------------------------------------------------
    def _lookup(self, call: SmcccCall, number: int) -> Registration | None:
        """The registration event `number` (x1, 32 bits) names for the calling PE."""
        number &= 0xFFFF_FFFF
        reg = self.shared.get(number)
        if reg is None:
            reg = self.pes[call.vcpu.index].private.get(number)
        return reg

    def _pe_by_affinity(self, mpidr: int) -> Pe | None:
        """The PE whose MPIDR affinity fields (Aff3..Aff0) `mpidr` names; other bits are ignored."""
        for v in self.ctx.vcpus:
            if v.mpidr & MPIDR_AFF_MASK == mpidr & MPIDR_AFF_MASK:
                return self.pes[v.index]
        return None

    def _unregister(self, reg: Registration) -> int:
        if not transition(reg, Action.UNREGISTER):
            return PENDING if reg.state & RUNNING else DENIED
        reg.clear()
        intid = reg.spec.interrupt
        if intid is not None and intid in self._lines:
            self.ctx.lines.to_gic(intid, True)  # the line belongs to the vGIC again
        return PENDING if reg.state & RUNNING else SUCCESS

    def _release(self, reg: Registration) -> None:
        intid = reg.spec.interrupt
        assert intid is not None
        del self.bound[intid]
        del self.shared[reg.spec.number]

    def _raise(self, reg: Registration) -> bool:
        if not reg.state & REGISTERED:
            log.debug("SDEI %s raised while unregistered: dropped", reg.spec.describe())
            return False
        reg.pending = True
        self._schedule_event(reg)
        return True

    def _targets(self, reg: Registration) -> list[Pe]:
        if reg.pe is not None:
            return [self.pes[reg.pe]]
        if reg.route_pe:
            pe = self._pe_by_affinity(reg.affinity)
            return [pe] if pe is not None else []
        return self.pes

    def _schedule_event(self, reg: Registration) -> None:
        for pe in self._targets(reg):
            self._schedule(pe)

    def _schedule(self, pe: Pe) -> None:
        """If `pe` has something to deliver, have its vCPU thread look (lock held)."""
        if pe.poked or self._next(pe) is None:
            return
        pe.poked = True
        vcpu = self.ctx.vcpus[pe.index]
        if vcpu.on_own_thread():
            vcpu.defer(self._deliver)  # after the current exit is answered, before KVM_RUN
        else:
            vcpu.request(self._deliver)

    def _next(self, pe: Pe) -> Registration | None:
        """The event to dispatch on `pe` now: pending, registered, enabled, not running, routed
        here; critical before normal, then the lowest number; none while masked or while a
        handler of the same or higher priority runs (§6.3)."""
        vcpu = self.ctx.vcpus[pe.index]
        if pe.masked or vcpu.power != Power.ON or vcpu.powered_down:
            return None
        if pe.frames and pe.frames[-1].reg.spec.critical:
            return None
        need_critical = bool(pe.frames)
        best: Registration | None = None
        for reg in (*pe.private.values(), *self.shared.values()):
            if not reg.pending or reg.state != REGISTERED | ENABLED:
                continue
            if need_critical and not reg.spec.critical:
                continue
            if reg.pe is None and reg.route_pe and reg.affinity != vcpu.mpidr & MPIDR_AFF_MASK:
                continue
            if best is None or (reg.spec.critical, -reg.spec.number) > (best.spec.critical, -best.spec.number):
                best = reg
        return best

    # --- dispatch and completion (on the vCPU's own thread) --------------------------------
    def _deliver(self, vcpu: ServiceVcpu) -> None:
        """Enter the handler of every event due on this PE: a critical one found after a normal
        one was entered preempts it at once."""
        pe = self.pes[vcpu.index]
        while True:
            with self.lock:
                pe.poked = False
                reg = self._next(pe)
                if reg is None:
                    return
                reg.pending = False
                transition(reg, Action.DISPATCH)
                frame = Frame(reg)
                pe.frames.append(frame)
                entry, arg, number = reg.entry, reg.arg, reg.spec.number
            enter_handler(vcpu, frame, number, entry, arg)
            self.dispatches += 1
            self._trace(vcpu, f"dispatch event {number} -> handler {entry:#x} (arg {arg:#x}, interrupted "
                              f"pc {frame.pc:#x} pstate {frame.pstate:#x})")

    def _complete(self, call: SmcccCall, resume: int | None) -> Results:
        vcpu = call.vcpu
        pe = self.pes[vcpu.index]
        with self.lock:
            if not pe.frames:
                return DENIED  # no handler is running on this PE
            frame = pe.frames.pop()
            reg = frame.reg
            self._ended(reg)
        leave_handler(vcpu, frame, resume)
        if resume is None:
            self._trace(vcpu, f"complete event {reg.spec.number}: back to pc {frame.pc:#x}")
        else:
            self._trace(vcpu, f"complete event {reg.spec.number}: resume at {resume:#x} "
                              f"(ELR_EL1 {frame.pc:#x}, SPSR_EL1 {frame.pstate:#x})")
        with self.lock:
            self._schedule(pe)  # what waited for this handler, here
            if reg.spec.shared:
                self._schedule_event(reg)  # a shared event may now run elsewhere
        return NO_RESULT  # the registers now hold the resumed context

    def _ended(self, reg: Registration) -> None:
        """A handler of `reg` is over (lock held)."""
        transition(reg, Action.COMPLETE)
        intid = reg.spec.interrupt
        if intid is not None and reg.state & REGISTERED and intid in self._lines:
            reg.pending = True  # level-sensitive: still asserted, so it fires again

    def _trace(self, vcpu: ServiceVcpu, text: str) -> None:
        self.ctx.trace(TraceEvent(vcpu.index, "sdei", text))

"""SDEI 1.1 as an SMCCC service: the 19 calls (DEN0054B §5.1), events raised by the host or by
bound interrupt lines, and when to deliver what to which PE (§6.2, §6.3).

Locking: one lock guards every registration and PE; registers are only touched on the owning
vCPU's thread (delivery.py).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

from devicetree.builder import Node
from pyvmm.errors import VmmError
from pyvmm.machine.irq_lines import NR_IRQS, SPI_BASE
from pyvmm.services.sdei.delivery import Pe
from pyvmm.services.sdei.events import (
    BIND_EVENT_BASE,
    BIND_SLOTS,
    CONTEXT_REGS,
    DENIED,
    ENABLED,
    ERROR_NAMES,
    EVENT_NUMBER_MAX,
    FEATURE_BIND_SLOTS,
    FEATURE_RELATIVE_MODE,
    FN_BASE,
    FN_COUNT,
    INFO_PRIORITY,
    INFO_ROUTING_AFF,
    INFO_ROUTING_MODE,
    INFO_SIGNALED,
    INFO_TYPE,
    INVALID_PARAMETERS,
    MPIDR_AFF_MASK,
    OUT_OF_RESOURCE,
    PENDING,
    REGISTERED,
    ROUTE_PE,
    RUNNING,
    SUCCESS,
    VERSION_1_1,
    Action,
    EventSpec,
    Registration,
    transition,
)
from pyvmm.services.sdei.scheduling import EventScheduler
from pyvmm.smccc.call import SmcccCall
from pyvmm.smccc.context import ServiceContext, ServiceVcpu
from pyvmm.smccc.function_id import Owner
from pyvmm.smccc.service import Results, Service, function

log = logging.getLogger("pyvmm")


class Sdei(EventScheduler, Service):
    name = "SDEI"
    owner = Owner.STANDARD_SECURE
    ranges = ((FN_BASE, FN_COUNT),)
    error_names = ERROR_NAMES

    def __init__(self, ctx: ServiceContext, events: Iterable[EventSpec] = (), bind_slots: int = BIND_SLOTS) -> None:
        self.ctx = ctx
        self.lock = threading.RLock()
        self.bind_slots = bind_slots
        specs = {0: EventSpec(0, signalable=True)}
        for e in events:
            if not 0 < e.number <= EVENT_NUMBER_MAX:
                raise VmmError(f"SDEI event number {e.number} is not in 1..{EVENT_NUMBER_MAX} (0 is the "
                               "software-signalled event)")
            if BIND_EVENT_BASE <= e.number < BIND_EVENT_BASE + bind_slots:
                raise VmmError(f"SDEI event number {e.number} is one of the bound-interrupt events "
                               f"{BIND_EVENT_BASE}..{BIND_EVENT_BASE + bind_slots - 1}")
            if e.number in specs:
                raise VmmError(f"SDEI event {e.number} is declared twice")
            specs[e.number] = EventSpec(e.number, e.shared, e.critical)
        self.specs = specs
        self.dispatches = 0  # handlers entered, for tests and benchmarks
        self._lines: set[int] = set()  # INTIDs of bound interrupts whose line is high
        self._init_state()
        ctx.lines.intercept(self.interrupt)  # bound lines come here before the vGIC

    def _init_state(self) -> None:
        self.shared: dict[int, Registration] = {n: Registration(s, None) for n, s in self.specs.items() if s.shared}
        self.bound: dict[int, Registration] = {}  # INTID -> the bound event's registration
        self.pes = [Pe(v.index, {n: Registration(s, v.index) for n, s in self.specs.items() if not s.shared})
                    for v in self.ctx.vcpus]

    # --- the host side ---------------------------------------------------------------------
    def trigger(self, number: int, cpu: int | None = None) -> bool:
        """Raise event `number` (any thread). A private event needs the target vCPU index `cpu`;
        a shared one goes where its routing says. True if the event is now pending; False if it
        was dropped because the client has not registered it."""
        with self.lock:
            spec = self.specs.get(number)
            if spec is None:  # bound events are raised by their interrupt line, not by name
                raise VmmError(f"there is no SDEI event {number} to signal (declared: "
                               f"{', '.join(str(n) for n in sorted(self.specs))})")
            if spec.shared:
                if cpu is not None:
                    raise VmmError(f"SDEI event {number} is shared: its routing picks the PE, not --cpu")
                reg = self.shared[number]
            else:
                if cpu is None or not 0 <= cpu < len(self.pes):
                    raise VmmError(f"SDEI event {number} is private: name the vCPU (0..{len(self.pes) - 1})")
                reg = self.pes[cpu].private[number]
            return self._raise(reg)

    def interrupt(self, intid: int, level: bool) -> bool:
        """A device drives interrupt line `intid`. True when SDEI owns the line (it is bound and
        the bound event registered): then the level raises or clears the event and the vGIC
        must not see it."""
        with self.lock:
            if level:
                self._lines.add(intid)
            else:
                self._lines.discard(intid)
            reg = self.bound.get(intid)
            if reg is None or not reg.state & REGISTERED:
                return False
            if level:
                self._raise(reg)
            elif not reg.state & RUNNING:
                reg.pending = False  # level-sensitive: withdrawn before it was taken
            return True

    def status(self) -> list[dict[str, object]]:
        """Every event's state, for `pyvmm sdei status` and tests."""
        with self.lock:
            rows = []
            for pe in self.pes:
                for reg in pe.private.values():
                    rows.append(self._row(reg, f"vcpu{pe.index}"))
            for reg in self.shared.values():
                rows.append(self._row(reg, "shared"))
            return rows

    @staticmethod
    def _row(reg: Registration, where: str) -> dict[str, object]:
        names = [n for bit, n in ((REGISTERED, "registered"), (ENABLED, "enabled"), (RUNNING, "running"))
                 if reg.state & bit]
        return {"event": reg.spec.number, "where": where, "critical": reg.spec.critical,
                "state": "+".join(names) or "unregistered", "pending": reg.pending,
                "interrupt": reg.spec.interrupt}

    def masked(self, cpu: int) -> bool:
        return self.pes[cpu].masked

    def pe_masks(self) -> list[bool]:
        """Every PE's mask, by vCPU index."""
        with self.lock:
            return [pe.masked for pe in self.pes]

    # --- hooks from the VM -----------------------------------------------------------------
    def reset(self) -> None:
        """SYSTEM_RESET: everything unregistered and released, every PE masked. The machine
        lowers every interrupt line next, so bound lines need not be handed back."""
        with self.lock:
            self._lines.clear()
            self._init_state()

    def dt_node(self) -> tuple[str, Node]:
        # Documentation/devicetree/bindings/arm/firmware/sdei.txt: under /firmware, with the conduit
        return "/firmware", Node("sdei", {"compatible": "arm,sdei-1.0", "method": self.ctx.conduit})

    def power_on(self, vcpu: ServiceVcpu) -> None:
        """A PE powers on (PSCI CPU_ON): masked, private events unregistered (§6.2, as TF-A's
        psci_cpu_on_finish hook does)."""
        with self.lock:
            pe = self.pes[vcpu.index]
            self._end_handlers(pe)  # in case a CPU_ON came before its CPU_OFF was heard of
            for reg in pe.private.values():
                reg.state = 0
                reg.clear()

    def woken(self, vcpu: ServiceVcpu) -> None:
        """A vCPU left suspend: deliver what waited for it."""
        with self.lock:
            self._schedule(self.pes[vcpu.index])

    def powered_off(self, vcpu: ServiceVcpu) -> None:
        """A PE powered off (PSCI CPU_OFF) inside handlers: they can never complete there, so they
        end as if completed (an event left RUNNING would answer UNREGISTER with PENDING and
        SHARED_RESET with DENIED for ever), and a shared event may run on another PE again."""
        with self.lock:
            self._end_handlers(self.pes[vcpu.index])

    def _end_handlers(self, pe: Pe) -> None:
        """The PE is masked and the handlers it was running end as if completed (lock held)."""
        pe.masked = True
        ended = [frame.reg for frame in pe.frames]
        pe.frames.clear()
        for reg in ended:
            self._ended(reg)
            if reg.spec.shared:
                self._schedule_event(reg)

    # --- SMCCC functions -------------------------------------------------------------------
    @function(FN_BASE + 0x0, name="SDEI_VERSION", describe="describe_value")
    def version(self, call: SmcccCall) -> Results:
        return VERSION_1_1

    @function(FN_BASE + 0x1, name="SDEI_EVENT_REGISTER", args=("event", "entry_point_address", "ep_argument",
                                                              "flags", "affinity"))
    def register(self, call: SmcccCall) -> Results:
        number, entry, arg, flags, affinity = call.args(5)
        with self.lock:
            reg = self._lookup(call, number)
            if reg is None:
                return INVALID_PARAMETERS
            if entry == 0 or entry & 3:
                return INVALID_PARAMETERS  # handlers are A64 code: a non-zero, word-aligned address
            if flags & ~ROUTE_PE:
                return INVALID_PARAMETERS  # reserved bits, or relative mode (FEATURES says unsupported)
            if reg.spec.shared and flags & ROUTE_PE and self._pe_by_affinity(affinity) is None:
                return INVALID_PARAMETERS
            if not transition(reg, Action.REGISTER):
                return DENIED
            reg.entry, reg.arg = entry, arg
            reg.route_pe = bool(reg.spec.shared and flags & ROUTE_PE)  # private events: routing ignored
            reg.affinity = affinity & MPIDR_AFF_MASK if reg.route_pe else 0
            reg.pending = False
            intid = reg.spec.interrupt
            if intid is not None:  # SDEI takes the line from the vGIC (TF-A: interrupt to EL3)
                if intid in self._lines:
                    self.ctx.lines.to_gic(intid, False)
                    reg.pending = True  # a level-sensitive line still asserted
            return SUCCESS

    @function(FN_BASE + 0x2, name="SDEI_EVENT_ENABLE", args=("event",))
    def enable(self, call: SmcccCall) -> Results:
        return self._simple(call, Action.ENABLE)

    @function(FN_BASE + 0x3, name="SDEI_EVENT_DISABLE", args=("event",))
    def disable(self, call: SmcccCall) -> Results:
        return self._simple(call, Action.DISABLE)

    def _simple(self, call: SmcccCall, action: Action) -> Results:
        with self.lock:
            reg = self._lookup(call, call.arg(1))
            if reg is None:
                return INVALID_PARAMETERS
            if not transition(reg, action):
                return DENIED
            if action == Action.ENABLE:
                self._schedule_event(reg)
            return SUCCESS

    @function(FN_BASE + 0x4, name="SDEI_EVENT_CONTEXT", args=("param",))
    def context(self, call: SmcccCall) -> Results:
        param = call.arg(1)
        pe = self.pes[call.vcpu.index]
        if not pe.frames:
            return DENIED  # only a running handler has an interrupted context
        if param >= CONTEXT_REGS:
            return INVALID_PARAMETERS
        return pe.frames[-1].x[param]

    @function(FN_BASE + 0x5, name="SDEI_EVENT_COMPLETE", args=("status",))
    def complete(self, call: SmcccCall) -> Results:
        return self._complete(call, resume=None)

    @function(FN_BASE + 0x6, name="SDEI_EVENT_COMPLETE_AND_RESUME", args=("resume_addr",))
    def complete_and_resume(self, call: SmcccCall) -> Results:
        return self._complete(call, resume=call.arg(1))

    @function(FN_BASE + 0x7, name="SDEI_EVENT_UNREGISTER", args=("event",))
    def unregister(self, call: SmcccCall) -> Results:
        with self.lock:
            reg = self._lookup(call, call.arg(1))
            if reg is None:
                return INVALID_PARAMETERS
            return self._unregister(reg)

    @function(FN_BASE + 0x8, name="SDEI_EVENT_STATUS", args=("event",))
    def event_status(self, call: SmcccCall) -> Results:
        with self.lock:
            reg = self._lookup(call, call.arg(1))
            return INVALID_PARAMETERS if reg is None else reg.state

    @function(FN_BASE + 0x9, name="SDEI_EVENT_GET_INFO", args=("event", "info"))
    def get_info(self, call: SmcccCall) -> Results:
        number, info = call.args(2)
        with self.lock:
            reg = self._lookup(call, number)
            if reg is None:
                return INVALID_PARAMETERS
            spec = reg.spec
            if info == INFO_TYPE:
                return int(spec.shared)
            if info == INFO_SIGNALED:
                return int(spec.signalable)  # 1: EVENT_SIGNAL can raise it
            if info == INFO_PRIORITY:
                return int(spec.critical)
            if info in (INFO_ROUTING_MODE, INFO_ROUTING_AFF):
                if not spec.shared:
                    return INVALID_PARAMETERS  # routing is a shared event's property
                if not reg.state & REGISTERED:
                    return DENIED
                if info == INFO_ROUTING_MODE:
                    return int(reg.route_pe)
                return reg.affinity if reg.route_pe else INVALID_PARAMETERS
            return INVALID_PARAMETERS

    @function(FN_BASE + 0xA, name="SDEI_EVENT_ROUTING_SET", args=("event", "routing_mode", "affinity"))
    def routing_set(self, call: SmcccCall) -> Results:
        number, mode, affinity = call.args(3)
        with self.lock:
            reg = self._lookup(call, number)
            if reg is None or not reg.spec.shared:
                return INVALID_PARAMETERS
            if mode & ~ROUTE_PE or (mode & ROUTE_PE and self._pe_by_affinity(affinity) is None):
                return INVALID_PARAMETERS
            if not transition(reg, Action.ROUTING):
                return DENIED  # only registered, disabled and not running (§5.1.10)
            reg.route_pe = bool(mode & ROUTE_PE)
            reg.affinity = affinity & MPIDR_AFF_MASK if reg.route_pe else 0
            return SUCCESS

    @function(FN_BASE + 0xB, name="SDEI_PE_MASK", describe="describe_value")
    def pe_mask(self, call: SmcccCall) -> Results:
        with self.lock:
            pe = self.pes[call.vcpu.index]
            was_unmasked = not pe.masked
            pe.masked = True
            return int(was_unmasked)  # 1: this call masked the PE; 0: it already was

    @function(FN_BASE + 0xC, name="SDEI_PE_UNMASK")
    def pe_unmask(self, call: SmcccCall) -> Results:
        with self.lock:
            pe = self.pes[call.vcpu.index]
            pe.masked = False
            self._schedule(pe)
            return SUCCESS

    @function(FN_BASE + 0xD, name="SDEI_INTERRUPT_BIND", args=("interrupt_number",), describe="describe_value")
    def interrupt_bind(self, call: SmcccCall) -> Results:
        intid = call.arg(1) & 0xFFFF_FFFF
        with self.lock:
            if intid < 16 or intid >= NR_IRQS:
                return INVALID_PARAMETERS  # SGIs cannot be bound; no such interrupt
            if intid < SPI_BASE:
                return OUT_OF_RESOURCE  # PPIs are the in-kernel timers' and PMU's: no private slots
            if self.ctx.lines.is_irqfd(intid):
                return INVALID_PARAMETERS  # signalled by KVM irqfd (virtio): it never passes through pyvmm
            reg = self.bound.get(intid)
            if reg is not None:
                return reg.spec.number  # already bound: the same event
            used = {r.spec.number for r in self.bound.values()}
            free = [n for n in range(BIND_EVENT_BASE, BIND_EVENT_BASE + self.bind_slots) if n not in used]
            if not free:
                return OUT_OF_RESOURCE
            spec = EventSpec(free[0], shared=True, interrupt=intid)
            reg = self.bound[intid] = self.shared[spec.number] = Registration(spec, None)
            return spec.number

    @function(FN_BASE + 0xE, name="SDEI_INTERRUPT_RELEASE", args=("event",))
    def interrupt_release(self, call: SmcccCall) -> Results:
        with self.lock:
            reg = self._lookup(call, call.arg(1))
            if reg is None or reg.spec.interrupt is None:
                return INVALID_PARAMETERS  # not a bound event
            if not transition(reg, Action.RELEASE):
                return DENIED  # registered, or its handler still running
            self._release(reg)
            return SUCCESS

    @function(FN_BASE + 0xF, name="SDEI_EVENT_SIGNAL", args=("event", "target_pe"))
    def signal(self, call: SmcccCall) -> Results:
        number, target = call.args(2)
        with self.lock:
            if number & 0xFFFF_FFFF != 0:
                return INVALID_PARAMETERS  # only event 0 can be signalled
            pe = self._pe_by_affinity(target)
            if pe is None:
                return INVALID_PARAMETERS
            self._raise(pe.private[0])
            return SUCCESS

    @function(FN_BASE + 0x10, name="SDEI_FEATURES", args=("feature",), describe="describe_value")
    def features(self, call: SmcccCall) -> Results:
        feature = call.arg(1)
        if feature == FEATURE_BIND_SLOTS:
            return self.bind_slots << 16  # shared slots [31:16], private slots [15:0] = 0
        if feature == FEATURE_RELATIVE_MODE:
            return 0  # relative mode is not supported
        return INVALID_PARAMETERS

    @function(FN_BASE + 0x11, name="SDEI_PRIVATE_RESET")
    def private_reset(self, call: SmcccCall) -> Results:
        with self.lock:
            results = [self._unregister(reg) for reg in self.pes[call.vcpu.index].private.values()]
            return DENIED if PENDING in results else SUCCESS

    @function(FN_BASE + 0x12, name="SDEI_SHARED_RESET")
    def shared_reset(self, call: SmcccCall) -> Results:
        with self.lock:
            results = [self._unregister(reg) for reg in list(self.shared.values())]
            if PENDING in results:
                return DENIED  # a handler is still running somewhere
            for reg in list(self.bound.values()):
                self._release(reg)
            return SUCCESS

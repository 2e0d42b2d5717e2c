"""Routes forwarded SMCCC calls to services by function-ID range and writes the results back.

SMCCC 1.4 rules applied here, for every service:
  * an ID with no handler, or a call over the conduit this VM does not offer, gets
    NOT_SUPPORTED (-1) in x0 (§5.2); no forwarded call is ever re-entered unanswered;
  * results of an SMC32/HVC32 call are truncated to 32 bits (§2.6);
  * only x0..x3 are written, and only as many as the handler returned (x4-x17 are never touched,
    as §2.6 requires); a result equal to what the register already holds (known from a lazily
    read argument) is not written, saving a KVM_SET_ONE_REG;
  * the General Service Queries (Call Count, Call UID, Revision: §6.2) are answered for every
    owner a registered service declares;
  * in a VM whose callers are in AArch32 state (`aarch32_callers`), every SMC64/HVC64 call gets
    NOT_SUPPORTED, whoever would otherwise answer it (SMCCC 1.3 §5.2; QEMU does the same).
The KVM filter is derived from what is registered: routed ranges are forwarded, denied ranges
denied by KVM itself, everything else left to KVM. With AArch32 callers the whole SMC64 half
(outside KVM's reserved Arm architecture range) is forwarded, so that the rule above also covers
what KVM would answer itself (its TRNG_RND64) and every such call shows in a trace.
"""

from __future__ import annotations

import bisect
import os
import reprlib
import time
from collections.abc import Callable
from typing import NamedTuple

from kvm_bindings.constants import HypercallExitFlag, SmcccFilterAction
from pyvmm.errors import VmmError
from pyvmm.smccc import filter as smccc_filter
from pyvmm.smccc.call import SmcccCall
from pyvmm.smccc.context import ServiceVcpu, TraceEvent
from pyvmm.smccc.filter import FilterRange
from pyvmm.smccc.function_id import (
    CALL_COUNT,
    CALL_UID,
    FAST_CALL,
    NOT_SUPPORTED,
    OWNER_SHIFT,
    REVISION,
    SMC64,
    is_id_range,
)
from pyvmm.smccc.service import NO_RESULT, PYVMM_UID, Function, Handler, HandlerService, Results, Service

_U64 = 0xFFFF_FFFF_FFFF_FFFF
_U32 = 0xFFFF_FFFF
_MIN = -(1 << 63)
_MIN32 = -(1 << 31)
# With AArch32 callers the filter forwards [_SMC64_FORWARDED, 2**32): every SMC64 ID except the
# SMC64 Arm architecture range 0xC0000000-0xC000FFFF, which KVM keeps (filter.RESERVED)
_SMC64_FORWARDED = 0xC001_0000  # the most negative result: -1 is NOT_SUPPORTED
_SMC = HypercallExitFlag.SMC.value
CONDUITS = ("hvc", "smc")


class Route(NamedTuple):
    base: int
    size: int  # function IDs in the route
    service: Service


class TraceRecord(NamedTuple):
    vcpu: int
    conduit: str
    function_id: int
    function: Function | None
    args: tuple[int, ...]
    results: tuple[int, ...] | None  # None: the call did not return (NO_RESULT)
    seconds: float
    note: str = ""


class HandlerError(VmmError):
    pass


class GeneralQueries(Service):
    """Call Count, Call UID and Revision for one owner (SMCCC §6.2), over its services."""

    def __init__(self, owner: int, dispatcher: Dispatcher) -> None:
        self.owner, self._dispatcher = owner, dispatcher
        self.name = f"owner {owner} queries"
        base = FAST_CALL | (owner << OWNER_SHIFT)
        self.ranges = ((base | CALL_COUNT, 4),)
        self._base = base

    def _owned(self) -> list[Service]:
        return [s for s in self._dispatcher.services if s.owner == self.owner and s is not self]

    def lookup(self, fid: int) -> Function | None:
        number = fid - self._base
        if number == CALL_COUNT:
            return Function("CALL_COUNT", self.call_count)
        if number == CALL_UID:
            return Function("CALL_UID", self.call_uid)
        if number == REVISION:
            return Function("REVISION", self.revision_query)
        return None

    def call_count(self, call: SmcccCall) -> int:
        """The owner's functions pyvmm implements, and those KVM answers itself (TRNG) that are
        neither forwarded nor denied."""
        d = self._dispatcher
        in_kernel = [fid for fid in d.kernel_functions.get(self.owner, ()) if d.left_to_kvm(fid)]
        return sum(len(s.functions()) for s in self._owned()) + len(in_kernel)

    def call_uid(self, call: SmcccCall) -> tuple[int, int, int, int]:
        """The UUID as four little-endian words of its little-endian byte form (w0 = time_low)."""
        owned = self._owned()
        raw = owned[0].uid if owned else PYVMM_UID
        w = [int.from_bytes(raw[i:i + 4], "little") for i in range(0, 16, 4)]
        return w[0], w[1], w[2], w[3]

    def revision_query(self, call: SmcccCall) -> tuple[int, int]:
        owned = self._owned()
        return owned[0].revision if owned else (1, 0)


class Dispatcher:
    def __init__(self, conduit: str = "hvc", *, aarch32_callers: bool = False, filter_missing: bool = False) -> None:
        """`aarch32_callers`: the vCPUs are KVM_ARM_VCPU_EL1_32BIT ones (every SMC64 call is refused);
        `filter_missing`: the host's KVM has no SMCCC filter (Linux < 6.4) and forwards nothing, so
        whatever needs a forwarded call is refused when it is asked for."""
        self._routes: list[Route] = []  # sorted by base, non-overlapping
        self._denied: list[FilterRange] = []
        self._cache: dict[int, tuple[Handler | None, int, int]] = {}  # by function ID: _cache_route()
        self.services: list[Service] = []
        self.calls = 0  # forwarded calls answered
        self._call_objects: dict[int, SmcccCall] = {}  # by vCPU index: each vCPU's one SmcccCall
        self._trace: Callable[[TraceRecord | TraceEvent], None] | None = None
        self._watch: Callable[[ServiceVcpu, int, int], None] | None = None
        self._observed = False  # a trace or a watch is set: the hot path's one test
        self.conduit = conduit
        self._frozen = False
        self.filter_missing = filter_missing
        self.aarch32_callers = aarch32_callers
        # by owner, the function IDs KVM answers itself (its TRNG): counted by Call Count
        self.kernel_functions: dict[int, tuple[int, ...]] = {}

    @property
    def trace(self) -> Callable[[TraceRecord | TraceEvent], None] | None:
        """Called with a record of every forwarded call once it is answered (and with services'
        own events), on the calling vCPU's thread."""
        return self._trace

    @trace.setter
    def trace(self, value: Callable[[TraceRecord | TraceEvent], None] | None) -> None:
        if value is not None:
            self._needs_forwarding("tracing SMCCC calls")
        self._trace = value
        self._observed = value is not None or self._watch is not None

    @property
    def watch(self) -> Callable[[ServiceVcpu, int, int], None] | None:
        """Called as `watch(vcpu, function_id, flags)` before a forwarded call is answered, on
        the calling vCPU's thread: it may hold the vCPU there (a debugger's catch) and change its
        registers, which the service then reads as the call's arguments."""
        return self._watch

    @watch.setter
    def watch(self, value: Callable[[ServiceVcpu, int, int], None] | None) -> None:
        if value is not None:
            self._needs_forwarding("catching SMCCC calls")
        self._watch = value
        self._observed = value is not None or self._trace is not None

    @property
    def conduit(self) -> str:
        return "smc" if self._smc else "hvc"

    @conduit.setter
    def conduit(self, value: str) -> None:
        if value not in CONDUITS:
            raise VmmError(f"the SMCCC conduit is 'hvc' or 'smc', not {value!r}")
        self._smc = _SMC if value == "smc" else 0

    # --- registration ----------------------------------------------------------------------
    def freeze(self) -> None:
        """The KVM filter has been derived from the routes and installed: KVM refuses a new one
        once a vCPU has run, so registration ends here."""
        self._frozen = True

    def _needs_forwarding(self, what: str) -> None:
        """Refuse `what` (before anything changes) on a host whose KVM forwards no call."""
        if self.filter_missing:
            raise smccc_filter.unavailable(what)

    def _check_open(self, what: str) -> None:
        if self._frozen:
            raise VmmError(f"{what}: the SMCCC filter is fixed once the VM runs; register services before run()")

    def add_service(self, service: Service) -> None:
        self._check_open(f"adding SMCCC service {service.name}")
        if service.ranges:
            self._needs_forwarding(f"the SMCCC service {service.name}")
        for base, count in service.ranges:
            self._check_range(base, count, service.name)
        self.services.append(service)
        for base, count in service.ranges:
            bisect.insort(self._routes, Route(base, count, service), key=lambda r: r.base)
        if service.owner >= 0 and not any(isinstance(s, GeneralQueries) and s.owner == service.owner
                                          for s in self.services):
            self.add_service(GeneralQueries(service.owner, self))
        self._cache.clear()

    def register(self, base: int, count: int, handler: Handler, name: str = "") -> None:
        """Forward [base, base + count) to `handler`, which returns x0 or (x0, .., x3)."""
        self.add_service(HandlerService(base, count, handler, name or getattr(handler, "__name__", "handler")))

    def replace(self, base: int, count: int, handler: Handler, name: str = "") -> None:
        """Like register(), after removing whatever routes overlap the range."""
        self._check_open(f"replacing {base:#x}+{count}")
        self._needs_forwarding(f"replacing SMCCC calls with {name or getattr(handler, '__name__', 'handler')}")
        self._remove_overlapping(base, count)
        self.register(base, count, handler, name)

    def deny(self, base: int, count: int, name: str = "") -> None:
        """Have KVM itself answer NOT_SUPPORTED for [base, base + count), with no exit at all;
        routes overlapping the range are removed."""
        self._check_open(f"denying {base:#x}+{count}")
        self._needs_forwarding("denying SMCCC calls")
        self._check_bounds(base, count, name)
        self._remove_overlapping(base, count)
        self._denied.append(FilterRange(base, count, SmcccFilterAction.DENY, name))

    def _check_bounds(self, base: int, count: int, name: str) -> None:
        if not is_id_range(base, count):
            raise VmmError(f"SMCCC range {base:#x}+{count} ({name}) is not within 32-bit function IDs")

    def _check_range(self, base: int, count: int, name: str) -> None:
        self._check_bounds(base, count, name)
        for r in self._routes:
            if r.base < base + count and base < r.base + r.size:
                raise VmmError(f"SMCCC range {base:#010x}+{count} ({name}) overlaps "
                               f"{r.base:#010x}+{r.size} ({r.service.name})")
        for d in self._denied:
            if d.overlaps(base, count):
                raise VmmError(f"SMCCC range {base:#010x}+{count} ({name}) overlaps denied range {d}")

    def _remove_overlapping(self, base: int, count: int) -> None:
        """Carve [base, base + count) out of every route and denied range; what lies outside it
        stays with its service (replacing PSCI_VERSION leaves the rest of PSCI in place)."""
        end = base + count
        routes: list[Route] = []
        for r in self._routes:
            routes += [Route(b, c, r.service) for b, c in _outside(r.base, r.size, base, end)]
        self._routes = sorted(routes, key=lambda r: r.base)
        self._denied = [FilterRange(b, c, d.action, d.name) for d in self._denied
                        for b, c in _outside(d.base, d.size, base, end)]
        self.services = [s for s in self.services if any(r.service is s for r in self._routes)
                         or isinstance(s, GeneralQueries) or not s.ranges]
        self._cache.clear()

    def left_to_kvm(self, fid: int) -> bool:
        """Neither forwarded to a service nor denied: KVM answers `fid` as it would anyway."""
        return self.resolve(fid) is None and not any(d.overlaps(fid, 1) for d in self._denied)

    def filter_ranges(self) -> list[FilterRange]:
        """The KVM filter that forwards exactly the routed ranges and denies the denied ones."""
        fwd = [FilterRange(r.base, r.size, SmcccFilterAction.FWD_TO_USER, r.service.name) for r in self._routes]
        ranges = fwd + self._denied
        if self.aarch32_callers:
            ranges = [FilterRange(b, c, r.action, r.name) for r in ranges
                      for b, c in _outside(r.base, r.size, _SMC64_FORWARDED, 1 << 32)]
            ranges.append(FilterRange(_SMC64_FORWARDED, (1 << 32) - _SMC64_FORWARDED, SmcccFilterAction.FWD_TO_USER,
                                      "SMC64 from AArch32"))
        return sorted(ranges, key=lambda r: r.base)

    def emit(self, event: TraceEvent) -> None:
        """A service's own line in the trace (an SDEI dispatch), if tracing is on."""
        trace = self._trace
        if trace is not None:
            trace(event)

    def reset(self) -> None:
        for s in self.services:
            s.reset()

    def power_on(self, vcpu: ServiceVcpu) -> None:
        for s in self.services:
            s.power_on(vcpu)

    def woken(self, vcpu: ServiceVcpu) -> None:
        for s in self.services:
            s.woken(vcpu)

    def powered_off(self, vcpu: ServiceVcpu) -> None:
        for s in self.services:
            s.powered_off(vcpu)

    def describe(self, function_id: int, flags: int) -> str:
        """A call as a person reads it: `0xc4000003 (CPU_ON, PSCI) over HVC`."""
        fn = self.resolve(function_id)
        conduit = "SMC" if flags & _SMC else "HVC"
        service = next((r.service.name for r in self._routes if r.base <= function_id < r.base + r.size), None)
        name = f" ({fn.name}, {service})" if fn is not None and service else ""
        return f"{function_id:#010x}{name} over {conduit}"

    # --- dispatch --------------------------------------------------------------------------
    def resolve(self, function_id: int) -> Function | None:
        if function_id & SMC64 and self.aarch32_callers:
            return None  # SMCCC 1.3 §5.2: no SMC64/HVC64 call is offered to AArch32 callers
        i = bisect.bisect_right(self._routes, function_id, key=lambda r: r.base) - 1
        if i >= 0 and function_id < self._routes[i].base + self._routes[i].size:
            return self._routes[i].service.lookup(function_id)
        return None

    def dispatch(self, vcpu: ServiceVcpu, function_id: int, flags: int) -> None:
        """Answer one KVM_EXIT_HYPERCALL on `vcpu` (called on that vCPU's thread), results and all."""
        x0 = self.answer(vcpu, function_id, flags)
        if x0 is not None:
            vcpu.set_x0(x0)

    def answer(self, vcpu: ServiceVcpu, function_id: int, flags: int) -> int | None:
        """Answer one KVM_EXIT_HYPERCALL on `vcpu` (on that vCPU's thread) up to writing x0: the
        value x0 gets, as a 64-bit pattern, or None when nothing is left to write (the call does
        not return, or its results have been written here: several, or a traced call).

        The exit loop's hot path, which writes x0 itself with its prepared ioctl: a cached lookup
        of the handler and the call's width, the vCPU's call object, the handler, a range check."""
        if self._observed:
            watch = self._watch
            if watch is not None:
                watch(vcpu, function_id, flags)
            if self._trace is not None:
                self._dispatch_traced(vcpu, function_id, flags)
                return None
        try:
            handler, low, mask = self._cache[function_id]
        except KeyError:
            handler, low, mask = self._cache_route(function_id)
        if handler is None or flags & _SMC != self._smc:
            self.calls += 1
            return NOT_SUPPORTED & mask
        try:  # the vCPU's one call object, filled in for this call (valid while its handler runs)
            call = self._call_objects[vcpu.index]
        except KeyError:
            call = self._call_objects[vcpu.index] = SmcccCall(vcpu, function_id, flags)
        call.vcpu, call.function_id, call.flags, call._args = vcpu, function_id, flags, None
        try:
            results = handler(call)
        except Exception as e:
            raise handler_failed(handler, function_id, e) from e
        self.calls += 1
        if type(results) is int and low <= results <= mask:
            return results & mask  # the common case: one KVM_SET_ONE_REG, by the caller
        if results is not NO_RESULT:
            write_results(vcpu, call, checked(results, function_id, handler))
        return None

    def _cache_route(self, function_id: int) -> tuple[Handler | None, int, int]:
        """The handler of `function_id` (None: NOT_SUPPORTED), and the least result and the mask
        of its width: 64 bits, or 32 for an SMC32/HVC32 call (SMCCC §2.6)."""
        fn = self.resolve(function_id)
        low, mask = (_MIN, _U64) if function_id & SMC64 else (_MIN32, _U32)
        route = (fn.handler if fn is not None else None, low, mask)
        if len(self._cache) < 4096:  # bounded: a guest may call any of 2**32 IDs
            self._cache[function_id] = route
        return route

    def _dispatch_traced(self, vcpu: ServiceVcpu, function_id: int, flags: int) -> None:
        fn = self.resolve(function_id)
        call = SmcccCall(vcpu, function_id, flags)
        args = call.args(len(fn.args)) if fn is not None else ()  # before x1.. hold results
        note = ""
        started = time.perf_counter()
        if fn is None:
            results: Results = NOT_SUPPORTED
            if function_id & SMC64 and self.aarch32_callers:
                note = "an SMC64 call from AArch32"
        elif flags & _SMC != self._smc:
            results, note = NOT_SUPPORTED, f"not offered over {call.conduit}"
        else:
            try:
                results = fn.handler(call)
            except Exception as e:
                raise handler_failed(fn.handler, function_id, e) from e
        self.calls += 1
        shown = None
        if results is not NO_RESULT:
            values = checked(results, function_id, fn.handler if fn is not None else None)
            write_results(vcpu, call, values)
            mask = _U64 if function_id & SMC64 else _U32
            shown = tuple(v & mask for v in values)
        trace = self._trace
        assert trace is not None
        trace(TraceRecord(vcpu.index, call.conduit, function_id, fn, args, shown,
                               time.perf_counter() - started, note))


def _outside(base: int, count: int, cut_base: int, cut_end: int) -> list[tuple[int, int]]:
    """The parts of [base, base + count) outside [cut_base, cut_end)."""
    end = base + count
    if end <= cut_base or cut_end <= base:
        return [(base, count)]
    parts = []
    if base < cut_base:
        parts.append((base, cut_base - base))
    if cut_end < end:
        parts.append((cut_end, end - cut_end))
    return parts


def handler_failed(handler: object, function_id: int, error: Exception) -> HandlerError:
    """What a handler's exception becomes: one line naming the handler and the call."""
    return HandlerError(f"SMCCC handler {handler_name(handler)} for {function_id:#010x} raised "
                        f"{type(error).__name__}: {error}")


def handler_name(handler: object) -> str:
    """A handler as a person finds it: `handle() in my_service.py`, or its repr."""
    code = getattr(handler, "__code__", None) or getattr(getattr(handler, "__func__", None), "__code__", None)
    if code is None:
        return repr(handler)
    return f"{getattr(handler, '__qualname__', code.co_name)}() in {os.path.basename(code.co_filename)}"


def checked(results: object, function_id: int, handler: object) -> tuple[int, ...]:
    """A handler's results as x0..x3, or a HandlerError that names the handler and the call: a
    result is x0 (an int), 1 to 4 of them (a list or tuple), or NO_RESULT; each fits the call's
    registers, signed or not: 64 bits, or 32 for an SMC32/HVC32 call (SMCCC §2.6: its results are
    w0-w3, so a wider value is the handler's mistake, not something to truncate quietly)."""
    items: list[object] = [results] if isinstance(results, int) else list(results) \
        if isinstance(results, list | tuple) else []
    values = [v for v in items if isinstance(v, int)]
    low, high, bits = (_MIN, _U64, 64) if function_id & SMC64 else (_MIN32, _U32, 32)
    if items and 1 <= len(items) <= 4 and len(values) == len(items) and all(low <= v <= high for v in values):
        return tuple(values)
    shown = reprlib.repr(results).replace("\n", " ")  # one line, however large the object
    if not items:
        problem = f"returned {shown}"
    elif not 1 <= len(items) <= 4:
        problem = f"returned {len(items)} results"
    elif len(values) != len(items):
        problem = f"returned {shown}, not integers"
    else:
        problem = f"returned {shown}, beyond {bits} bits" + ("" if bits == 64 else " (an SMC32 call)")
    raise HandlerError(f"SMCCC handler {handler_name(handler)} for {function_id:#010x} {problem}: a handler "
                       "returns x0, or 1 to 4 results (x0-x3) as integers, or NO_RESULT")


def write_results(vcpu: ServiceVcpu, call: SmcccCall, values: tuple[int, ...]) -> None:
    mask = _U64 if call.function_id & SMC64 else _U32
    vcpu.set_x(0, values[0] & mask)
    for n in range(1, len(values)):
        v = values[n] & mask
        if call.known_register(n) != v:
            vcpu.set_x(n, v)

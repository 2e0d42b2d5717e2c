"""Routes forwarded SMCCC calls to handlers by function-ID range and writes the results back.

SMCCC 1.4 rules applied here, for every handler:
  * an ID with no handler gets NOT_SUPPORTED (-1) in x0 (§5.2); no call is re-entered unanswered;
  * results of an SMC32/HVC32 call are truncated to 32 bits (§2.6);
  * only x0..x3 are written, and only as many as the handler returned (x4-x17 are never touched,
    so they are preserved as §2.6 requires); a result equal to what the register already holds
    (known from a lazily read argument) is not written, saving a KVM_SET_ONE_REG.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

from kvm_bindings.constants import SmcccFilterAction
from pyvmm.errors import VmmError
from pyvmm.smccc.call import SmcccCall
from pyvmm.smccc.filter import FilterRange
from pyvmm.smccc.function_id import NOT_SUPPORTED, SMC64

if TYPE_CHECKING:
    from pyvmm.vcpu import Vcpu

Results = int | Sequence[int]
Handler = Callable[[SmcccCall], Results]

_U64 = 0xFFFF_FFFF_FFFF_FFFF
_U32 = 0xFFFF_FFFF
_MISS = object()


class Route(NamedTuple):
    base: int
    count: int
    handler: Handler
    name: str


class HandlerError(VmmError):
    pass


class Dispatcher:
    def __init__(self) -> None:
        self._routes: list[Route] = []  # sorted by base, non-overlapping
        self._denied: list[FilterRange] = []
        self._cache: dict[int, Handler | None] = {}
        self.calls = 0  # forwarded calls answered

    def register(self, base: int, count: int, handler: Handler, name: str = "") -> None:
        """Forward [base, base + count) to `handler`; it returns x0 or (x0, .., x3)."""
        if count <= 0 or not 0 <= base <= _U32 or base + count > 1 << 32:
            raise VmmError(f"SMCCC range {base:#x}+{count} is not within 32-bit function IDs")
        for r in self._routes:
            if r.base < base + count and base < r.base + r.count:
                raise VmmError(f"SMCCC range {base:#010x}+{count} ({name}) overlaps {r.base:#010x}+{r.count} ({r.name})")
        route = Route(base, count, handler, name or getattr(handler, "__name__", "handler"))
        bisect.insort(self._routes, route, key=lambda r: r.base)
        self._cache.clear()

    def deny(self, base: int, count: int, name: str = "") -> None:
        """Have KVM itself answer NOT_SUPPORTED for [base, base + count) (no exit at all)."""
        self._denied.append(FilterRange(base, count, SmcccFilterAction.DENY, name))

    def filter_ranges(self) -> list[FilterRange]:
        """The KVM filter that forwards exactly the routed ranges and denies the denied ones."""
        fwd = [FilterRange(r.base, r.count, SmcccFilterAction.FWD_TO_USER, r.name) for r in self._routes]
        return sorted(fwd + self._denied, key=lambda r: r.base)

    def lookup(self, function_id: int) -> Handler | None:
        handler = None
        i = bisect.bisect_right(self._routes, function_id, key=lambda r: r.base) - 1
        if i >= 0 and function_id < self._routes[i].base + self._routes[i].count:
            handler = self._routes[i].handler
        if len(self._cache) < 4096:  # bounded: a guest may call any of 2**32 IDs
            self._cache[function_id] = handler
        return handler

    def dispatch(self, vcpu: Vcpu, function_id: int, flags: int) -> None:
        """Answer one KVM_EXIT_HYPERCALL on `vcpu` (called on that vCPU's thread).

        This is the exit loop's hot path: a cached handler lookup, the handler, and (for the
        common single result) exactly one KVM_SET_ONE_REG.
        """
        call = SmcccCall(vcpu, function_id, flags)
        handler = self._cache.get(function_id, _MISS)
        if handler is _MISS:
            handler = self.lookup(function_id)
        if handler is None:
            results: Results = NOT_SUPPORTED
        else:
            try:
                results = handler(call)
            except Exception as e:
                raise HandlerError(f"SMCCC handler for {function_id:#010x} raised {type(e).__name__}: {e}") from e
        self.calls += 1
        if type(results) is int:  # the common single result: one prepared KVM_SET_ONE_REG(x0)
            fd = vcpu.fd
            fd.x0_value[0] = results & (_U64 if function_id & SMC64 else _U32)
            if fd.write_x0() < 0:
                fd.failed("KVM_SET_ONE_REG")
        else:
            write_results(vcpu, call, results)


def write_results(vcpu: Vcpu, call: SmcccCall, results: Results) -> None:
    mask = _U64 if call.function_id & SMC64 else _U32
    values = _as_results(results)
    vcpu.set_x(0, values[0] & mask)
    for n in range(1, len(values)):
        v = values[n] & mask
        if call.known_register(n) != v:
            vcpu.set_x(n, v)


def _as_results(results: Results) -> tuple[int, ...]:
    values = (results,) if isinstance(results, int) else tuple(results)
    if not 1 <= len(values) <= 4:
        raise HandlerError(f"an SMCCC handler returns 1 to 4 results (x0-x3), not {len(values)}")
    return values

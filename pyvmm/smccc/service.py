"""SMCCC services: a named set of functions in forwarded function-ID ranges.

A service subclasses `Service`, lists the ranges KVM must forward to it, and marks its handlers
with `@function(fid, ...)`. Any ID inside its ranges without a handler is answered NOT_SUPPORTED
by the dispatcher (SMCCC 1.4 §5.2). A handler takes the `SmcccCall` and returns x0, up to four
values (x0..x3), or NO_RESULT when the call does not return to the caller (CPU_OFF, SYSTEM_OFF).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from enum import Enum
from typing import Any, Final, Literal, NamedTuple

from devicetree.builder import Node
from pyvmm.smccc.call import SmcccCall
from pyvmm.smccc.context import ServiceVcpu

# pyvmm's implementation UID, returned by every Call UID query pyvmm answers (SMCCC §6.2.2):
# UUID 7f1d2a3e-5c4b-4e8a-9b6d-70797666d6d6, in its little-endian byte form (w0 = time_low).
PYVMM_UID = bytes.fromhex("3e2a1d7f4b5c8a4e9b6d70797666d6d6")


def signed(x0: int) -> int:
    """x0 as a signed number: 64-bit, or 32-bit when it fits in 32 bits (an SMC32 result)."""
    if x0 >> 63:
        return x0 - (1 << 64)
    if x0 >> 31 and x0 < 1 << 32:
        return x0 - (1 << 32)
    return x0


class NoResult(Enum):
    """The call does not return to its caller: write no registers."""

    NO_RESULT = 0

    def __repr__(self) -> str:
        return "NO_RESULT"


NO_RESULT: Final = NoResult.NO_RESULT
Results = int | Sequence[int] | Literal[NoResult.NO_RESULT]
Handler = Callable[[SmcccCall], Results]


class Function(NamedTuple):
    """One SMCCC function as a service implements it (names are for traces)."""

    name: str
    handler: Handler
    args: tuple[str, ...] = ()
    describe: Callable[[int], str] | None = None  # x0 -> e.g. "INVALID_PARAMETERS"


def function(*fids: int, name: str, args: tuple[str, ...] = (),
             describe: str = "describe_result") -> Callable[[Callable[..., Results]], Any]:
    """Mark a Service method as the handler of `fids` (e.g. the SMC32 and SMC64 IDs).
    `describe` names the service method that puts a name to its x0 in traces."""

    def mark(method: Callable[..., Results]) -> Callable[..., Results]:
        setattr(method, "__smccc__", (fids, name, args, describe))  # noqa: B010 - a marker on a function
        return method

    return mark


class Service:
    """Base class of SMCCC services. Subclasses set `name`, `owner` and `ranges`."""

    name: str = "service"
    owner: int = -1
    ranges: tuple[tuple[int, int], ...] = ()
    uid: bytes = PYVMM_UID  # 16 bytes, UUID little-endian form
    revision: tuple[int, int] = (1, 0)

    def lookup(self, fid: int) -> Function | None:
        """The function implementing `fid`, or None (the caller gets NOT_SUPPORTED)."""
        table = self.__dict__.get("_table")
        if table is None:
            table = self._table = self.functions()
        return table.get(fid)

    def functions(self) -> dict[int, Function]:
        """Every function this service implements, by function ID."""
        table: dict[int, Function] = {}
        for attr in dir(type(self)):
            spec = getattr(getattr(type(self), attr), "__smccc__", None)
            if spec is not None:
                fids, name, args, describe = spec
                for fid in fids:
                    table[fid] = Function(name, getattr(self, attr), args, getattr(self, describe))
        return table

    error_names: dict[int, str] = {}  # the service's error codes, for traces

    def describe_result(self, x0: int) -> str:
        """The name of an error code in x0 (64-bit, or 32-bit from an SMC32 call), for traces."""
        return self.error_names.get(signed(x0), "")

    def describe_value(self, x0: int) -> str:
        """For functions that return values: nothing, unless x0 holds an error code."""
        return self.describe_result(x0) if signed(x0) < 0 else ""

    def power_on(self, vcpu: ServiceVcpu) -> None:
        """A vCPU is powering on through PSCI CPU_ON: per-PE state starts over."""

    def woken(self, vcpu: ServiceVcpu) -> None:
        """A vCPU has left suspend."""

    def powered_off(self, vcpu: ServiceVcpu) -> None:
        """A vCPU has powered itself off (PSCI CPU_OFF), on its own thread."""

    def reset(self) -> None:
        """Return to the power-on state (the VM is being reset)."""

    def dt_node(self) -> tuple[str, Node] | None:
        """(parent path, node): what the guest discovers this service by in the device tree, as
        kvmtool's generate_fdt_node callbacks give each part its own node; None for no node."""
        return None


class HandlerService(Service):
    """A plain function serving a whole range: the smallest way to prototype a service."""

    def __init__(self, base: int, count: int, handler: Handler, name: str) -> None:
        self.name, self.ranges, self._handler = name, ((base, count),), handler

    def functions(self) -> dict[int, Function]:
        return {}  # every ID in the range is the handler's; see lookup()

    def lookup(self, fid: int) -> Function | None:
        base, count = self.ranges[0]
        return Function(f"{self.name}[{fid - base:#x}]", self._handler) if base <= fid < base + count else None

"""One forwarded SMCCC call, as a service handler sees it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvm_bindings.constants import HypercallExitFlag
from pyvmm.smccc.function_id import SMC64

_SMC = HypercallExitFlag.SMC.value
# (1, .., count) for args(count): making a range and a list comprehension costs more than the reads
_NUMBERS = tuple(tuple(range(1, count + 1)) for count in range(18))

if TYPE_CHECKING:
    from pyvmm.smccc.context import ServiceVcpu


class SmcccCall:
    """The function ID and conduit come with the exit; arguments x1..x17 are read from the vCPU
    only when a handler asks for them (one KVM_GET_ONE_REG each, cached).

    A call is valid while its handler runs. The dispatcher hands each vCPU's calls the same object,
    its four slots filled in again for the next one: making one per call was a quarter of the
    dispatch's own cost (benchmarks/dispatch.py). A handler that needs a call's values later
    copies them.
    """

    __slots__ = ("vcpu", "function_id", "flags", "_args")

    def __init__(self, vcpu: ServiceVcpu, function_id: int, flags: int = 0) -> None:
        self.vcpu = vcpu
        self.function_id = function_id
        self.flags = flags  # kvm_run.hypercall.flags (KVM_HYPERCALL_EXIT_*)
        self._args: list[int | None] | None = None  # x<n> at [n] once read; made at the first read

    @property
    def smc(self) -> bool:
        return bool(self.flags & _SMC)

    @property
    def conduit(self) -> str:
        return "smc" if self.flags & _SMC else "hvc"

    @property
    def smc64(self) -> bool:
        return bool(self.function_id & SMC64)

    def arg(self, n: int) -> int:
        """x<n> as the guest passed it (w<n>, zero-extended, for an SMC32/HVC32 call)."""
        if not 1 <= n <= 17:
            raise ValueError(f"SMCCC arguments are x1..x17, not x{n}")
        args = self._args
        if args is None:
            args = self._args = [None] * 18
        value = args[n]
        if value is None:
            value = args[n] = self.vcpu.get_x(n)
        return value if self.function_id & SMC64 else value & 0xFFFF_FFFF

    def args(self, count: int) -> tuple[int, ...]:
        """x1..x<count> (each read at most once per call)."""
        numbers = _NUMBERS[count] if 0 <= count <= 17 else range(1, count + 1)  # past 17: arg() refuses
        return tuple(map(self.arg, numbers))

    def known_register(self, n: int) -> int | None:
        """x<n>'s current value if this call has already read it (lets the dispatcher skip writes)."""
        return None if self._args is None else self._args[n]

    def __repr__(self) -> str:
        return f"SmcccCall({self.function_id:#010x} via {self.conduit} on vcpu{self.vcpu.index})"

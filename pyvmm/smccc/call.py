"""One forwarded SMCCC call, as a service handler sees it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pyvmm.smccc.function_id import SMC64, FunctionId, decode

if TYPE_CHECKING:
    from pyvmm.vcpu import Vcpu


class SmcccCall:
    """The function ID and conduit come with the exit; arguments x1..x17 are read from the vCPU
    only when a handler asks for them (one KVM_GET_ONE_REG each, cached)."""

    __slots__ = ("vcpu", "function_id", "smc", "_args")

    def __init__(self, vcpu: Vcpu, function_id: int, smc: bool) -> None:
        self.vcpu = vcpu
        self.function_id = function_id
        self.smc = smc
        self._args: dict[int, int] = {}

    @property
    def conduit(self) -> str:
        return "smc" if self.smc else "hvc"

    @property
    def smc64(self) -> bool:
        return bool(self.function_id & SMC64)

    @property
    def fid(self) -> FunctionId:
        return decode(self.function_id)

    def arg(self, n: int) -> int:
        """x<n> as the guest passed it (w<n>, zero-extended, for an SMC32/HVC32 call)."""
        if not 1 <= n <= 17:
            raise ValueError(f"SMCCC arguments are x1..x17, not x{n}")
        value = self._args.get(n)
        if value is None:
            value = self.vcpu.get_x(n)
            self._args[n] = value
        return value if self.function_id & SMC64 else value & 0xFFFF_FFFF

    def args(self, count: int) -> tuple[int, ...]:
        return tuple(self.arg(n) for n in range(1, count + 1))

    def known_register(self, n: int) -> int | None:
        """x<n>'s current value if this call has already read it (lets the dispatcher skip writes)."""
        return self._args.get(n)

    def __repr__(self) -> str:
        return f"SmcccCall({self.function_id:#010x} via {self.conduit} on vcpu{self.vcpu.index})"

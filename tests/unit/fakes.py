"""Fakes for unit tests of pure logic: a vCPU whose registers live in a dict."""

from __future__ import annotations

from kvm_bindings import ffi


class FakeFd:
    def __init__(self, vcpu: FakeVcpu) -> None:
        self.vcpu = vcpu
        self.x0_value = ffi.new("uint64_t *")

    def write_x0(self) -> int:
        self.vcpu.set_x(0, self.x0_value[0])
        return 0

    def failed(self, name: str) -> bool:
        raise AssertionError(name)


class FakeVcpu:
    """Counts register reads and writes, so tests can pin how many ioctls an exit costs."""

    def __init__(self, index: int = 0, regs: dict[int, int] | None = None) -> None:
        self.index = index
        self.x = dict(regs or {})
        self.reads: list[int] = []
        self.writes: list[tuple[int, int]] = []
        self.fd = FakeFd(self)

    def get_x(self, n: int) -> int:
        self.reads.append(n)
        return self.x.get(n, 0)

    def set_x(self, n: int, value: int) -> None:
        self.writes.append((n, value))
        self.x[n] = value

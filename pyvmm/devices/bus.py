"""The MMIO bus: guest-physical ranges mapped to device models.

A device is a hypervisor-agnostic state machine with `read(offset, size) -> int` and
`write(offset, size, value)`; the bus finds it by address (the shape of rust-vmm's vm-superio).

A device may also name a *hot register*: a 32-bit register the guest reads on every interrupt
(virtio-mmio's InterruptStatus). The vCPU loop answers a 32-bit load from one straight from
`hot_reads`, by address, with no decoding, lookup or completion frames in between.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import NamedTuple, Protocol

from pyvmm.errors import VmmError


class MmioDevice(Protocol):
    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


class Mapping(NamedTuple):
    base: int
    size: int
    device: MmioDevice
    name: str


class MmioBus:
    def __init__(self) -> None:
        self._maps: list[Mapping] = []
        self._bases: list[int] = []
        # guest-physical address -> the register's value (a 32-bit load at exactly that address)
        self.hot_reads: dict[int, Callable[[], int]] = {}

    def add_hot_register(self, addr: int, read: Callable[[], int]) -> None:
        """Have a 32-bit load at `addr`, inside a device already on the bus, answered by `read()`
        on the vCPU loop's fast path. It must return what the device's read(offset, 4) would."""
        m = self.find(addr, 4)
        if m is None or addr & 3:
            raise VmmError(f"hot register {addr:#x} is not an aligned register of a device on the bus")
        self.hot_reads[addr] = read

    def add(self, base: int, size: int, device: MmioDevice, name: str) -> None:
        if size <= 0:
            raise VmmError(f"MMIO region for {name} at {base:#x} has no size")
        for m in self._maps:
            if m.base < base + size and base < m.base + m.size:
                raise VmmError(f"MMIO region {name} {base:#x}+{size:#x} overlaps {m.name} {m.base:#x}+{m.size:#x}")
        i = bisect.bisect(self._bases, base)
        self._maps.insert(i, Mapping(base, size, device, name))
        self._bases.insert(i, base)

    def find(self, addr: int, size: int = 1) -> Mapping | None:
        i = bisect.bisect_right(self._bases, addr) - 1
        if i >= 0:
            m = self._maps[i]
            if addr + size <= m.base + m.size:
                return m
        return None

    def overlaps(self, base: int, size: int) -> Mapping | None:
        return next((m for m in self._maps if m.base < base + size and base < m.base + m.size), None)

"""Interrupt lines: the one thing a device is handed to interrupt the guest.

Every line is a GIC SPI (INTID 32 + n; on arm64 KVM's GSI for KVM_IRQFD is the SPI number n):
  * IrqLine: a level the device drives (the UART's), through KVM_IRQ_LINE, unless an SDEI client
    has bound the line (SDEI_INTERRUPT_BIND): then the level goes to SDEI instead of the vGIC;
  * IrqFd: an eventfd KVM turns into an edge on its SPI (KVM_IRQFD; virtio's), so the device's
    worker interrupts the guest without pyvmm's vCPU threads, and SDEI cannot take it.
`InterruptLines` hands them out, one SPI each, in order.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Protocol

from kvm_bindings.constants import KVM_ARM_IRQ_TYPE_SHIFT, KVM_ARM_IRQ_TYPE_SPI
from pyvmm.errors import VmmError

SPI_BASE = 32
NR_IRQS = 256  # SGIs, PPIs and 224 SPIs; a multiple of 32 (vgic: KVM_DEV_ARM_VGIC_GRP_NR_IRQS)

Interceptor = Callable[[int, bool], bool]  # (INTID, level) -> True if it took the level


class IrqChipFd(Protocol):
    """The VM fd's two interrupt ioctls."""

    def irq_line(self, irq: int, level: int) -> None: ...

    def irqfd(self, fd: int, gsi: int, flags: int = 0, resamplefd: int = 0) -> None: ...


class IrqLine:
    """A level-triggered SPI driven from any thread."""

    __slots__ = ("spi", "intid", "_lines", "level")

    def __init__(self, spi: int, lines: InterruptLines) -> None:
        self.spi, self.intid, self._lines = spi, SPI_BASE + spi, lines
        self.level = False

    def set(self, level: bool) -> None:
        self.level = level
        self._lines.drive(self, level)


class IrqFd:
    """An SPI KVM raises, as an edge, whenever `trigger()` writes its eventfd."""

    __slots__ = ("spi", "intid", "fd")

    def __init__(self, spi: int, fd: int) -> None:
        self.spi, self.intid, self.fd = spi, SPI_BASE + spi, fd

    def trigger(self) -> None:
        os.eventfd_write(self.fd, 1)


class InterruptLines:
    def __init__(self, vm_fd: IrqChipFd) -> None:
        self._fd = vm_fd
        self._lock = threading.Lock()
        self._lines: dict[int, IrqLine] = {}  # by INTID
        self._irqfds: dict[int, IrqFd] = {}
        self._next_spi = 0
        self._interceptor: Interceptor | None = None  # SDEI's, while it is enabled

    def _allocate_spi(self) -> int:
        spi = self._next_spi
        if SPI_BASE + spi >= NR_IRQS:
            raise VmmError(f"no interrupt line left: the GIC has {NR_IRQS - SPI_BASE} SPIs")
        self._next_spi += 1
        return spi

    def line(self) -> IrqLine:
        """A new level-triggered line, low."""
        line = IrqLine(self._allocate_spi(), self)
        self._lines[line.intid] = line
        return line

    def irqfd(self) -> IrqFd:
        """A new eventfd-driven line (KVM_IRQFD)."""
        spi = self._allocate_spi()
        fd = os.eventfd(0, os.EFD_CLOEXEC)
        try:
            self._fd.irqfd(fd, spi)
        except BaseException:
            os.close(fd)
            raise
        line = self._irqfds[SPI_BASE + spi] = IrqFd(spi, fd)
        return line

    def intercept(self, interceptor: Interceptor) -> None:
        """Offer every level change to `interceptor` first; what it takes skips the vGIC."""
        self._interceptor = interceptor

    def drive(self, line: IrqLine, level: bool) -> None:
        interceptor = self._interceptor
        if interceptor is not None and interceptor(line.intid, level):
            return
        self.to_gic(line.intid, level)

    def to_gic(self, intid: int, level: bool) -> None:
        """KVM_IRQ_LINE for an SPI: irq_type SPI, irq_id = INTID (Documentation/virt/kvm/api.rst)."""
        with self._lock:  # one line's level changes reach KVM in the order they were made
            self._fd.irq_line((KVM_ARM_IRQ_TYPE_SPI << KVM_ARM_IRQ_TYPE_SHIFT) | intid, int(level))

    def is_irqfd(self, intid: int) -> bool:
        return intid in self._irqfds

    def lower_all(self) -> None:
        """The machine's reset: every level line low, at the vGIC too."""
        for line in self._lines.values():
            line.level = False
            self.to_gic(line.intid, False)

    def close(self) -> None:
        for line in self._irqfds.values():
            os.close(line.fd)
        self._irqfds.clear()

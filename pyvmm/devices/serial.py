"""The VM's serial port: a 16550A at kvmtool's address, its SPI, its DT node, the host console."""

from __future__ import annotations

from typing import TYPE_CHECKING

from devicetree.builder import U64, Node, Phandles
from pyvmm.devices.uart import Uart16550

if TYPE_CHECKING:
    from pyvmm.vm import Vm

UART_BASE = 0x100_0000  # kvmtool's arm64 ARM_UART_MMIO_BASE
UART_SIZE = 8
UART_CLOCK = 1_843_200


class SerialPort:
    alias = "serial0"

    def __init__(self, vm: Vm, output, base: int = UART_BASE) -> None:  # type: ignore[no-untyped-def]
        self.base = base
        self.spi = vm.allocate_spi()
        self.uart = Uart16550(output, lambda level: vm.set_spi(self.spi, level))
        vm.add_device(base, UART_SIZE, self.uart, "uart", dt=self)

    def dt_node(self, ph: Phandles) -> Node:
        return Node(f"uart@{self.base:x}", {
            "compatible": "ns16550a", "reg": [U64(self.base), U64(UART_SIZE)], "clock-frequency": UART_CLOCK,
            "interrupts": [0, self.spi, 4]})  # GIC SPI, level high

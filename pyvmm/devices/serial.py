"""The VM's serial port: a 16550A at kvmtool's address, its interrupt line, its DT node."""

from __future__ import annotations

from collections.abc import Callable

from devicetree.builder import U64, Node, Phandles
from pyvmm.devices.uart import Uart16550
from pyvmm.machine.irq_lines import IrqLine

UART_BASE = 0x100_0000  # kvmtool's arm64 ARM_UART_MMIO_BASE
UART_SIZE = 8
UART_CLOCK = 1_843_200


class SerialPort:
    name = "uart"
    alias = "serial0"

    def __init__(self, output: Callable[[int], None], line: IrqLine, base: int = UART_BASE) -> None:
        self.base, self.size = base, UART_SIZE
        self.line = line
        self.spi = line.spi
        self.uart = Uart16550(output, line.set)

    def dt_node(self, ph: Phandles) -> Node:
        # Documentation/devicetree/bindings/serial/8250.yaml
        return Node(f"uart@{self.base:x}", {
            "compatible": "ns16550a", "reg": [U64(self.base), U64(UART_SIZE)], "clock-frequency": UART_CLOCK,
            "interrupts": [0, self.spi, 4]})  # GIC SPI, level high

    # --- the life cycle: a UART has no thread, only state to reset -------------------------
    def start(self) -> None:
        pass

    def release_waiters(self) -> None:
        pass

    def quiesce(self, deadline: float) -> bool:
        return True

    def reset(self) -> None:
        self.uart.reset()

    def resume(self) -> None:
        pass

    def stop(self, deadline: float) -> bool:
        return True

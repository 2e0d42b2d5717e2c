"""A 16550A UART (National Semiconductor PC16550D datasheet), byte registers, as kvmtool offers.

A hypervisor-agnostic state machine: the VMM calls read/write for MMIO, `receive()` for host
input (from any thread), and the device drives its interrupt line through `set_irq(level)`.
Transmission is instant: THR is always empty, so THRE is always set and the THR-empty interrupt
fires as soon as it is enabled or a byte is written, until IIR reports it or THR is written.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

# register offsets (reg-shift 0)
RBR_THR_DLL, IER_DLM, IIR_FCR, LCR, MCR, LSR, MSR, SCR = range(8)
IER_RDI, IER_THRI = 0x01, 0x02
IIR_NO_INT, IIR_THRI, IIR_RDI, IIR_FIFO_ENABLED = 0x01, 0x02, 0x04, 0xC0
FCR_ENABLE, FCR_CLEAR_RX = 0x01, 0x02
LCR_DLAB = 0x80
MCR_DTR, MCR_RTS, MCR_OUT1, MCR_OUT2, MCR_LOOP = 0x01, 0x02, 0x04, 0x08, 0x10
LSR_DR, LSR_OE, LSR_THRE, LSR_TEMT = 0x01, 0x02, 0x20, 0x40
MSR_CTS, MSR_DSR, MSR_RI, MSR_DCD = 0x10, 0x20, 0x40, 0x80
RX_FIFO_SIZE = 64


class Uart16550:
    def __init__(self, output: Callable[[int], None], set_irq: Callable[[bool], None]) -> None:
        self._output, self._set_irq = output, set_irq
        self._lock = threading.Lock()  # host input arrives on another thread
        self._rx: deque[int] = deque()
        self._power_on()

    def _power_on(self) -> None:
        """Register values after a master reset (datasheet table 5)."""
        self._rx.clear()
        self.ier = self.lcr = self.mcr = self.scr = self.fcr = 0
        self.dll, self.dlm = 0x0C, 0  # 9600 baud at 1.8432 MHz
        self._thr_pending = False
        self._overrun = False
        self._irq = False

    def reset(self) -> None:
        """The machine's reset: power-on state; the interrupt line is lowered by the machine."""
        with self._lock:
            self._power_on()

    # --- guest side ----------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        with self._lock:
            value = self._read(offset)
            self._update_irq()
            return value

    def write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            self._write(offset, value & 0xFF)
            self._update_irq()

    def _read(self, offset: int) -> int:
        dlab = self.lcr & LCR_DLAB
        if offset == RBR_THR_DLL:
            if dlab:
                return self.dll
            return self._rx.popleft() if self._rx else 0
        if offset == IER_DLM:
            return self.dlm if dlab else self.ier
        if offset == IIR_FCR:
            iir = self._iir()
            if iir & 0x0F == IIR_THRI:
                self._thr_pending = False  # reading IIR reports, and so clears, THR empty
            return iir | (IIR_FIFO_ENABLED if self.fcr & FCR_ENABLE else 0)
        if offset == LCR:
            return self.lcr
        if offset == MCR:
            return self.mcr
        if offset == LSR:
            lsr = LSR_THRE | LSR_TEMT | (LSR_DR if self._rx else 0) | (LSR_OE if self._overrun else 0)
            self._overrun = False
            return lsr
        if offset == MSR:
            return self._msr()
        if offset == SCR:
            return self.scr
        return 0

    def _write(self, offset: int, value: int) -> None:
        dlab = self.lcr & LCR_DLAB
        if offset == RBR_THR_DLL:
            if dlab:
                self.dll = value
            elif self.mcr & MCR_LOOP:
                self._push(value)  # loopback: what is sent comes straight back
                self._thr_pending = True
            else:
                self._output(value)
                self._thr_pending = True
        elif offset == IER_DLM:
            if dlab:
                self.dlm = value
            else:
                if value & IER_THRI and not self.ier & IER_THRI:
                    self._thr_pending = True  # THR is empty: enabling THRI raises it at once
                self.ier = value & 0x0F
        elif offset == IIR_FCR:
            self.fcr = value & (FCR_ENABLE | 0xC0)
            if value & FCR_CLEAR_RX:
                self._rx.clear()
        elif offset == LCR:
            self.lcr = value
        elif offset == MCR:
            self.mcr = value & 0x1F
        elif offset == SCR:
            self.scr = value

    def _iir(self) -> int:
        if self.ier & IER_RDI and self._rx:
            return IIR_RDI
        if self.ier & IER_THRI and self._thr_pending:
            return IIR_THRI
        return IIR_NO_INT

    def _msr(self) -> int:
        if self.mcr & MCR_LOOP:  # modem outputs looped back to the status inputs
            m = self.mcr
            return ((MSR_CTS if m & MCR_RTS else 0) | (MSR_DSR if m & MCR_DTR else 0)
                    | (MSR_RI if m & MCR_OUT1 else 0) | (MSR_DCD if m & MCR_OUT2 else 0))
        return MSR_DCD | MSR_DSR | MSR_CTS

    def _push(self, byte: int) -> None:
        if len(self._rx) >= RX_FIFO_SIZE:
            self._overrun = True
        else:
            self._rx.append(byte)

    def _update_irq(self) -> None:
        level = self._iir() != IIR_NO_INT
        if level != self._irq:
            self._irq = level
            self._set_irq(level)

    # --- host side -------------------------------------------------------------------------
    def receive(self, data: bytes) -> None:
        """Bytes typed on the host console, for the guest to read."""
        with self._lock:
            for byte in data:
                self._push(byte)
            self._update_irq()

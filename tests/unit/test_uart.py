"""The 16550A against what Linux's 8250 driver does with it."""

from __future__ import annotations

from pyvmm.devices.uart import IER_DLM as IER
from pyvmm.devices.uart import IIR_FCR as IIR
from pyvmm.devices.uart import LCR, LSR, MCR, MSR, RBR_THR_DLL, SCR, Uart16550

IER_ = 1


class Wire:
    def __init__(self) -> None:
        self.out: list[int] = []
        self.irq: list[bool] = []


def uart() -> tuple[Uart16550, Wire]:
    w = Wire()
    return Uart16550(w.out.append, w.irq.append), w


def test_transmit_and_thr_empty_interrupt() -> None:
    u, w = uart()
    assert u.read(IIR, 1) & 0x0F == 0x01  # no interrupt
    u.write(IER_, 1, 0x02)  # enable THRI: THR is empty, so it fires at once
    assert w.irq == [True]
    assert u.read(IIR, 1) & 0x0F == 0x02
    assert w.irq == [True, False]  # reading IIR reported and cleared it
    for ch in b"hi\n":
        u.write(RBR_THR_DLL, 1, ch)
    assert bytes(w.out) == b"hi\n"
    assert u.read(LSR, 1) & 0x60 == 0x60  # THRE and TEMT: always ready


def test_receive_raises_rdi_until_drained() -> None:
    u, w = uart()
    u.write(IER_, 1, 0x01)
    u.receive(b"ok")
    assert w.irq == [True]
    assert u.read(LSR, 1) & 1 and u.read(IIR, 1) & 0x0F == 0x04
    assert u.read(RBR_THR_DLL, 1) == ord("o") and u.read(RBR_THR_DLL, 1) == ord("k")
    assert w.irq == [True, False] and not u.read(LSR, 1) & 1
    u.receive(bytes(100))  # more than the FIFO holds: overrun reported once
    assert u.read(LSR, 1) & 0x02 and not u.read(LSR, 1) & 0x02


def test_divisor_latch_scratch_fifo_and_loopback() -> None:
    u, w = uart()
    u.write(LCR, 1, 0x83)
    u.write(RBR_THR_DLL, 1, 0x01)
    u.write(IER_, 1, 0x00)
    assert (u.read(RBR_THR_DLL, 1), u.read(IER_, 1)) == (0x01, 0x00)
    u.write(LCR, 1, 0x03)
    assert w.out == []  # divisor writes never reach the console
    u.write(SCR, 1, 0x5A)
    assert u.read(SCR, 1) == 0x5A
    u.write(IIR, 1, 0x01)  # FCR: FIFO on
    assert u.read(IIR, 1) & 0xC0 == 0xC0  # a 16550A reports its FIFO
    u.write(MCR, 1, 0x1A)  # loopback with RTS and OUT2: the 8250 driver's self-test
    assert u.read(MSR, 1) & 0xF0 == 0x90
    u.write(RBR_THR_DLL, 1, 0x41)
    assert u.read(RBR_THR_DLL, 1) == 0x41 and w.out == []


def test_hostile_offsets_and_values_do_nothing_bad() -> None:
    u, _ = uart()
    for offset in range(-4, 16):
        u.write(offset, 1, 0xFFFF_FFFF)
        assert 0 <= u.read(offset, 1) <= 0xFF
    assert IER == 1

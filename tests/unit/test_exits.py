"""Exit decoding from a kvm_run filled in by hand."""

from __future__ import annotations

import pytest

from kvm_bindings import CData, ffi
from kvm_bindings.constants import ExitReason, SystemEvent
from pyvmm.kvm import exits
from pyvmm.kvm.exits import DebugExit, MmioExit, NisvExit, SystemEventExit, UnknownExit


def new_run(reason: int) -> CData:
    run = ffi.new("struct kvm_run *")
    run.exit_reason = reason
    return run


def test_a_hypercall_is_read_at_the_fast_accessors() -> None:
    run = new_run(ExitReason.HYPERCALL)
    run.hypercall.nr = 0xC200_0001
    run.hypercall.flags = 1
    words, quads = memoryview(ffi.buffer(run)).cast("I"), memoryview(ffi.buffer(run)).cast("Q")
    assert words[exits.REASON] == ExitReason.HYPERCALL
    assert (quads[exits.HYPERCALL_NR], quads[exits.HYPERCALL_FLAGS]) == (0xC200_0001, 1)


def test_mmio_write_carries_little_endian_data() -> None:
    run = new_run(ExitReason.MMIO)
    run.mmio.phys_addr = 0x100_0000
    run.mmio.len = 4
    run.mmio.is_write = 1
    run.mmio.data[0:4] = b"\xef\xbe\xad\xde"
    assert exits.decode(run) == MmioExit(0x100_0000, 4, True, 0xDEADBEEF)


def test_mmio_read_and_completion() -> None:
    run = new_run(ExitReason.MMIO)
    run.mmio.phys_addr = 0x300_0000
    run.mmio.len = 2
    assert exits.decode(run) == MmioExit(0x300_0000, 2, False, 0)
    exits.complete_mmio_read(ffi.buffer(run), 0x12345, 2)
    assert bytes(run.mmio.data[0:8]) == b"\x45\x23" + bytes(6)
    exits.complete_mmio_read(ffi.buffer(run), 0xABCDEF, 2)  # only `size` bytes of the value
    assert bytes(run.mmio.data[0:8]) == b"\xef\xcd" + bytes(6)


@pytest.mark.parametrize(("size", "is_write"), [(1, True), (2, False), (4, True), (8, True), (0, True), (9, True)])
def test_mmio_fast_decode_matches_decode(size: int, is_write: bool) -> None:
    run = new_run(ExitReason.MMIO)
    run.mmio.phys_addr = 0x300_0060
    run.mmio.len = size
    run.mmio.is_write = is_write
    run.mmio.data[0:8] = bytes(range(1, 9))
    data = int.from_bytes(bytes(range(1, 9))[:size], "little") if is_write and 0 < size <= 8 else 0
    assert exits.decode_mmio(ffi.buffer(run)) == MmioExit(0x300_0060, size, is_write, data)
    assert exits.decode_mmio(ffi.buffer(run)) == exits.decode(run)


def test_mmio_with_bogus_length_decodes_without_data() -> None:
    run = new_run(ExitReason.MMIO)
    run.mmio.len = 200
    run.mmio.is_write = 1
    ev = exits.decode(run)
    assert isinstance(ev, MmioExit)
    assert ev.data == 0


def test_system_event() -> None:
    run = new_run(ExitReason.SYSTEM_EVENT)
    run.system_event.type = SystemEvent.RESET
    run.system_event.ndata = 1
    run.system_event.data[0] = 1
    ev = exits.decode(run)
    assert ev == SystemEventExit(SystemEvent.RESET, (1,))
    assert ev.name == "reset"
    run.system_event.ndata = 999  # hostile/garbage count is clamped
    ev = exits.decode(run)
    assert isinstance(ev, SystemEventExit)
    assert len(ev.data) == 16


def test_other_exits() -> None:
    assert exits.decode(new_run(ExitReason.INTR)) is exits.INTERRUPTED
    run = new_run(ExitReason.ARM_NISV)
    run.arm_nisv.fault_ipa = 0x1000_0000
    run.arm_nisv.esr_iss = 0x40
    assert exits.decode(run) == NisvExit(0x40, 0x1000_0000)
    assert exits.decode(new_run(12345)) == UnknownExit(12345)


@pytest.mark.parametrize(("ec", "kind"), [(0x3C, "breakpoint"), (0x30, "hw-breakpoint"), (0x31, "hw-breakpoint"),
                                          (0x32, "step"), (0x33, "step"), (0x34, "watchpoint"),
                                          (0x35, "watchpoint"), (0x00, "unknown")])
def test_debug_exit_kind_from_the_esr_class(ec: int, kind: str) -> None:
    run = new_run(ExitReason.DEBUG)
    run.debug.arch.hsr = ec << 26 | 0x40  # ISS WnR: a store
    run.debug.arch.far = 0x8000_1234
    ex = exits.decode(run)
    assert ex == DebugExit(ec << 26 | 0x40, 0x8000_1234)
    assert isinstance(ex, DebugExit) and ex.kind == kind and ex.write

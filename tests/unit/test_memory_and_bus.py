"""Guest memory bounds and the MMIO bus: pure logic, no KVM."""

from __future__ import annotations

import mmap

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvmm.devices.bus import MmioBus
from pyvmm.errors import GuestMemoryError, VmmError
from pyvmm.machine.memory import KVM_MEM_MAX_NR_PAGES, PAGE_SIZE, GuestMemory

BASE, SIZE = 0x8000_0000, 0x10_0000


def memory() -> GuestMemory:
    m = GuestMemory()
    m.add(BASE, SIZE)
    return m


def test_read_write_roundtrip() -> None:
    m = memory()
    m.write(BASE + 8, bytes.fromhex("8877665544332211"))
    assert m.read(BASE + 8, 8) == bytes.fromhex("8877665544332211")
    assert m.read(BASE + 12, 4) == bytes.fromhex("44332211")
    view = m.view(BASE, 16)
    view[0] = 0xAB
    assert m.read(BASE, 1) == b"\xab"


@pytest.mark.parametrize(("gpa", "size"), [
    (BASE - 1, 2), (BASE + SIZE - 1, 2), (BASE + SIZE, 1), (0, 1), (BASE, SIZE + 1), (-1, 1), (BASE, -1)])
def test_out_of_bounds_access_is_refused(gpa: int, size: int) -> None:
    with pytest.raises(GuestMemoryError):
        memory().view(gpa, size)


@given(st.integers(min_value=-(1 << 64), max_value=1 << 64), st.integers(min_value=-(1 << 20), max_value=1 << 40))
def test_no_guest_address_reaches_outside_ram(gpa: int, size: int) -> None:
    m = memory()
    try:
        view = m.view(gpa, size)
    except GuestMemoryError:
        return
    assert BASE <= gpa and gpa + size <= BASE + SIZE and len(view) == size


def test_overlapping_and_misaligned_regions_are_refused() -> None:
    m = memory()
    page = PAGE_SIZE  # the host's (16 KiB on Asahi Linux): tests/unit/test_host_layouts.py varies it
    with pytest.raises(GuestMemoryError, match="overlaps 0x80000000-0x800fffff"):
        m.add(BASE + SIZE - page, 2 * page)
    with pytest.raises(GuestMemoryError, match="multiple"):
        m.add(0x1000_0001, page)
    m.add(BASE + SIZE, page)  # adjacent is fine


def test_ram_is_mapped_without_reserving_it_and_no_larger_than_a_memslot(monkeypatch: pytest.MonkeyPatch) -> None:
    flags: list[int] = []
    real_mmap = mmap.mmap

    def spy(fd: int, size: int, flags_: int) -> mmap.mmap:
        flags.append(flags_)
        return real_mmap(fd, size, flags_)

    monkeypatch.setattr(mmap, "mmap", spy)
    memory().close()
    assert flags and all(f & 0x4000 for f in flags)  # Linux's MAP_NORESERVE, on any Python
    too_big = (KVM_MEM_MAX_NR_PAGES + 1) * PAGE_SIZE
    with pytest.raises(GuestMemoryError, match=f"cannot map {too_big >> 20} MiB of guest RAM: KVM takes at most"):
        GuestMemory().add(0, too_big)
    assert len(flags) == 1  # refused before any mapping


class Reg:
    def __init__(self) -> None:
        self.log: list[tuple[str, int, int, int]] = []

    def read(self, offset: int, size: int) -> int:
        return offset

    def write(self, offset: int, size: int, value: int) -> None:
        self.log.append(("w", offset, size, value))


def test_bus_finds_devices_and_refuses_overlaps() -> None:
    bus = MmioBus()
    a, b = Reg(), Reg()
    bus.add(0x100_0000, 0x1000, a, "uart")
    bus.add(0x300_0000, 0x200, b, "virtio0")
    found = bus.find(0x100_0FFC, 4)
    assert found is not None and found.device is a
    assert bus.find(0x100_0FFE, 4) is None  # straddles the end
    found = bus.find(0x300_0100)
    assert found is not None and found.device is b
    assert bus.find(0x200_0000) is None
    with pytest.raises(VmmError, match="overlaps uart"):
        bus.add(0x100_0800, 0x1000, Reg(), "other")

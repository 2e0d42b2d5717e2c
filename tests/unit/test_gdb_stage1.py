"""The stage-1 walker GDB's virtual addresses go through: each granule, block and page
mappings, both regions, top-byte-ignore, the MMU off, and faults."""

from __future__ import annotations

import pytest

from pyvmm.gdb.stage1 import Regs, TranslationFault, translate

TABLE = PAGE = 0b11  # descriptor bits [1:0]: a table (levels 0-2) or a page (level 3)
BLOCK = 0b01
TG0 = {12: 0b00 << 14, 14: 0b10 << 14, 16: 0b01 << 14}
TG1 = {12: 0b10 << 30, 14: 0b01 << 30, 16: 0b11 << 30}


class Tables:
    """Guest RAM holding page tables, as a dict of 64-bit words."""

    def __init__(self, granule: int) -> None:
        self.words: dict[int, int] = {}
        self.granule = granule
        self.next = 0x4000_0000

    def table(self) -> int:
        base = self.next
        self.next += 1 << self.granule
        return base

    def read(self, pa: int) -> int:
        if not 0x4000_0000 <= pa < 0x8000_0000:
            raise ValueError("outside RAM")
        return self.words.get(pa, 0)

    def map(self, root: int, va: int, pa: int, ia_bits: int, leaf_level: int = 3) -> None:
        """Map `va` to `pa` with a page (level 3) or a block at `leaf_level`."""
        g = self.granule
        stride = g - 3
        level = 4 - -(-(ia_bits - g) // stride)
        table = root
        while True:
            shift = g + stride * (3 - level)
            index = va >> shift & ((1 << min(stride, ia_bits - shift)) - 1)
            if level == leaf_level:
                self.words[table + 8 * index] = (pa & ~((1 << shift) - 1)) | (PAGE if level == 3 else BLOCK)
                return
            entry = self.words.get(table + 8 * index)
            if entry is None:
                nxt = self.table()
                self.words[table + 8 * index] = nxt | TABLE
            else:
                nxt = entry & ~0xFFF & ((1 << 48) - 1)
            table, level = nxt, level + 1


def regs(tcr: int, ttbr0: int = 0, ttbr1: int = 0) -> Regs:
    return Regs(sctlr=1, tcr=tcr, ttbr0=ttbr0, ttbr1=ttbr1)


@pytest.mark.parametrize("granule", [12, 14, 16])
@pytest.mark.parametrize("ia_bits", [39, 42, 48])
def test_pages_in_the_low_region_for_every_granule(granule: int, ia_bits: int) -> None:
    t = Tables(granule)
    root = t.table()
    va, pa = 0x12_3456_0000 & ((1 << ia_bits) - 1), 0x4800_0000
    t.map(root, va, pa, ia_bits)
    tcr = (64 - ia_bits) | TG0[granule]
    found = translate(va + 0x123, regs(tcr, ttbr0=root | (0x42 << 48)), t.read)  # ASID bits ignored
    assert found.pa == pa + 0x123 and found.level == 3 and found.size == 1 << granule


@pytest.mark.parametrize(("granule", "level", "size"), [(12, 1, 1 << 30), (12, 2, 2 << 20), (14, 2, 32 << 20),
                                                        (16, 2, 512 << 20)])
def test_block_mappings(granule: int, level: int, size: int) -> None:
    t = Tables(granule)
    root = t.table()
    va = 3 * size
    t.map(root, va, 0x2_0000_0000, 48, leaf_level=level)
    found = translate(va + 0x4567, regs(16 | TG0[granule], ttbr0=root), t.read)
    assert (found.pa, found.level, found.size) == (0x2_0000_0000 + 0x4567, level, size)


def test_the_high_region_and_top_byte_ignore() -> None:
    t = Tables(12)
    root1, root0 = t.table(), t.table()
    kernel_va = 0xFFFF_8000_1234_5000
    t.map(root1, kernel_va, 0x4100_0000, 48)
    t.map(root0, 0x40_0000, 0x4200_0000, 48)
    tcr = 16 | (16 << 16) | TG0[12] | TG1[12]
    r = regs(tcr, ttbr0=root0, ttbr1=root1)
    assert translate(kernel_va + 8, r, t.read).pa == 0x4100_0008
    with pytest.raises(TranslationFault, match="outside both regions"):
        translate(0x5600_0000_0040_0000, r, t.read)  # a tag in the top byte, TBI0 off
    tagged = regs(tcr | 1 << 37, ttbr0=root0, ttbr1=root1)
    assert translate(0x5600_0000_0040_0010, tagged, t.read).pa == 0x4200_0010


def test_faults_name_the_level_and_the_reason() -> None:
    t = Tables(12)
    root = t.table()
    t.map(root, 0x1000, 0x4300_0000, 48)
    r = regs(16 | TG0[12], ttbr0=root)
    with pytest.raises(TranslationFault, match=r"0x2000 is not mapped at level 3: an invalid descriptor"):
        translate(0x2000, r, t.read)
    with pytest.raises(TranslationFault, match="at level 0: an invalid descriptor"):
        translate(0x8000_0000_0000, r, t.read)
    t.words[root + 8 * 1] = 0x4000_0000 | BLOCK  # a block at level 0, which 4K does not allow
    with pytest.raises(TranslationFault, match="block descriptor at level 0"):
        translate(0x80_0000_0000, r, t.read)
    t.words[root + 8 * 2] = 0x7FFF_0000_0000 | TABLE  # a table outside guest RAM
    with pytest.raises(TranslationFault, match="outside guest RAM"):
        translate(0x100_0000_0000, r, t.read)
    with pytest.raises(TranslationFault, match="disabled"):
        translate(0x1000, regs(16 | TG0[12] | 1 << 7, ttbr0=root), t.read)  # EPD0


def test_with_the_mmu_off_addresses_are_physical() -> None:
    off = Regs(sctlr=0, tcr=0, ttbr0=0, ttbr1=0)
    assert translate(0x8000_1234, off, lambda pa: 0).pa == 0x8000_1234
    with pytest.raises(TranslationFault):
        translate(1 << 50, off, lambda pa: 0)

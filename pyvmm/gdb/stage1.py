"""Guest virtual to guest physical addresses, as the guest's own MMU would translate them for
EL1&0 stage 1 (Arm ARM, DDI 0487, D8 "The AArch64 Virtual Memory System Architecture"): what
GDB's m/M packets need, since GDB speaks in the guest's virtual addresses.

Covered: the MMU off (SCTLR_EL1.M = 0: VA = PA), TTBR0 and TTBR1 regions by TCR_EL1.T0SZ/T1SZ,
the 4K, 16K and 64K granules (TG0/TG1), the start level that follows from the input size,
table, block and page descriptors, and top-byte-ignore (TBI0/TBI1). Output addresses are 48-bit
(no FEAT_LPA/LPA2). Permissions are not checked: a debugger reads what the kernel could.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

SCTLR_M = 1 << 0
PA_MASK = (1 << 48) - 1
# TCR_EL1 fields (D19.2 TCR_EL1): the two regions' TxSZ, TGx, EPDx and TBIx
T0SZ_SHIFT, TG0_SHIFT, EPD0 = 0, 14, 1 << 7
T1SZ_SHIFT, TG1_SHIFT, EPD1 = 16, 30, 1 << 23
TBI0, TBI1 = 1 << 37, 1 << 38
TG0_BITS = {0b00: 12, 0b01: 16, 0b10: 14}  # TG0: 4K, 64K, 16K
TG1_BITS = {0b10: 12, 0b11: 16, 0b01: 14}  # TG1 encodes them differently
# Levels at which a block descriptor is allowed, per granule (D8.3, without FEAT_LPA)
BLOCK_LEVELS = {12: (1, 2), 14: (2,), 16: (2,)}


class TranslationFault(Exception):
    """The address is not mapped (or the tables are not something the MMU would walk)."""

    def __init__(self, va: int, why: str, level: int | None = None) -> None:
        where = f" at level {level}" if level is not None else ""
        super().__init__(f"{va:#x} is not mapped{where}: {why}")
        self.va, self.level = va, level


@dataclass(frozen=True)
class Regs:
    """The system registers the walk reads (KVM_GET_ONE_REG of each)."""

    sctlr: int
    tcr: int
    ttbr0: int
    ttbr1: int


@dataclass(frozen=True)
class Translation:
    pa: int
    level: int | None  # the level of the descriptor that mapped it; None with the MMU off
    size: int  # bytes mapped by that descriptor: the walk holds for [va & ~(size-1), +size)


def translate(va: int, regs: Regs, read_u64: Callable[[int], int]) -> Translation:
    """The physical address of `va`; `read_u64(pa)` reads a descriptor (guest RAM, little-endian;
    it raises for an address outside RAM, which is reported as a fault)."""
    if not regs.sctlr & SCTLR_M:
        if va > PA_MASK:
            raise TranslationFault(va, "beyond the 48-bit physical address space with the MMU off")
        return Translation(va, None, 1 << 12)
    high = bool(va >> 55 & 1)  # bit 55 picks the region when the top byte is ignored
    tbi = regs.tcr & (TBI1 if high else TBI0)
    if high:
        tsz, tg, epd, ttbr, granules = regs.tcr >> T1SZ_SHIFT & 0x3F, regs.tcr >> TG1_SHIFT & 3, EPD1, regs.ttbr1, TG1_BITS
    else:
        tsz, tg, epd, ttbr, granules = regs.tcr >> T0SZ_SHIFT & 0x3F, regs.tcr >> TG0_SHIFT & 3, EPD0, regs.ttbr0, TG0_BITS
    ia_bits = 64 - tsz
    if not 16 <= ia_bits <= 48:
        raise TranslationFault(va, f"a region of {ia_bits} bits, which this walker does not take")
    top_end = 56 if tbi else 64
    top = (va >> ia_bits) & ((1 << (top_end - ia_bits)) - 1)
    if top != ((1 << (top_end - ia_bits)) - 1 if high else 0):
        raise TranslationFault(va, f"outside both regions ({ia_bits}-bit, TCR_EL1 {regs.tcr:#x})")
    if regs.tcr & epd:
        raise TranslationFault(va, f"walks of the TTBR{int(high)} region are disabled (EPD{int(high)})")
    granule = granules.get(tg)
    if granule is None:
        raise TranslationFault(va, f"a reserved granule encoding TG{int(high)} = {tg}")
    stride = granule - 3
    levels = -(-(ia_bits - granule) // stride)  # each level resolves `stride` bits
    level = 4 - levels
    table = ttbr & PA_MASK & ~1  # ASID in bits 63:48, CnP in bit 0
    while True:
        shift = granule + stride * (3 - level)
        width = min(stride, ia_bits - shift)  # the start level may resolve fewer bits
        index = va >> shift & ((1 << width) - 1)
        try:
            desc = read_u64(table + 8 * index)
        except Exception:  # noqa: BLE001 - the guest's tables may point anywhere
            raise TranslationFault(va, f"its level-{level} table at {table:#x} is outside guest RAM", level) from None
        if not desc & 1:
            raise TranslationFault(va, "an invalid descriptor", level)
        out_mask = PA_MASK & ~((1 << shift) - 1)
        if level == 3:
            if not desc & 2:
                raise TranslationFault(va, "a reserved descriptor at level 3", level)
            return Translation((desc & out_mask) | (va & ((1 << shift) - 1)), level, 1 << shift)
        if not desc & 2:  # a block
            if level not in BLOCK_LEVELS[granule]:
                raise TranslationFault(va, f"a block descriptor at level {level}, where the {1 << granule >> 10}K "
                                       "granule allows none", level)
            return Translation((desc & out_mask) | (va & ((1 << shift) - 1)), level, 1 << shift)
        table = desc & PA_MASK & ~((1 << granule) - 1)
        level += 1

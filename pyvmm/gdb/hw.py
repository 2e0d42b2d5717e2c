"""Hardware breakpoints and watchpoints as the debug registers KVM loads for the guest while
KVM_GUESTDBG_USE_HW is set (api.rst, KVM_SET_GUEST_DEBUG; arm64's kvm_guest_debug_arch).

The encodings are the Arm ARM's (DDI 0487, D19.3 DBGBCR<n>_EL1, DBGBVR<n>_EL1, DBGWCR<n>_EL1,
DBGWVR<n>_EL1), for unlinked address matches at EL1 and EL0 (PMC/PAC = 0b11, HMC = 0, SSC = 0):

  breakpoint   BCR: E, PMC = 0b11, BAS = 0b1111 (an A64 instruction); BVR: the address
  watchpoint   WCR: E, PAC = 0b11, LSC (load, store or both), and either BAS, the bytes of an
               aligned doubleword (up to 8 contiguous bytes inside one), or MASK, a power-of-two
               region of 8 bytes to 2 GiB aligned to its size (BAS then all ones); WVR: its base
"""

from __future__ import annotations

from typing import NamedTuple

E = 1 << 0
EL1_AND_EL0 = 0b11 << 1  # PMC (breakpoints) and PAC (watchpoints)
BAS_A64 = 0b1111 << 5
LSC = {"read": 0b01 << 3, "write": 0b10 << 3, "access": 0b11 << 3}
WCR_BAS_SHIFT = 5
WCR_MASK_SHIFT = 24
ADDRESS_END = 1 << 64
MAX_MASK = 31  # a region of 2**31 bytes (MASK is 5 bits; 1 and 2 are reserved)


class Slot(NamedTuple):
    control: int  # DBGBCR or DBGWCR
    value: int  # DBGBVR or DBGWVR


def breakpoint_slot(address: int) -> Slot:
    """A hardware breakpoint on the A64 instruction at `address` (4-byte aligned)."""
    if not 0 <= address < ADDRESS_END or address & 3:
        raise ValueError(f"{address:#x} is not the address of an A64 instruction (4-byte aligned)")
    return Slot(E | EL1_AND_EL0 | BAS_A64, address)


def watchpoint_slot(address: int, length: int, kind: str) -> Slot:
    """A watchpoint on [address, address + length) for `kind` accesses: read, write or access."""
    if kind not in LSC:
        raise ValueError(f"a watchpoint watches reads, writes or both, not {kind!r}")
    if length < 1 or not 0 <= address <= ADDRESS_END - length:
        raise ValueError("a watchpoint covers at least one byte, all of them 64-bit addresses")
    control = E | EL1_AND_EL0 | LSC[kind]
    offset = address & 7
    if offset + length <= 8:
        bas = ((1 << length) - 1) << offset
        return Slot(control | bas << WCR_BAS_SHIFT, address & ~7)
    mask = length.bit_length() - 1
    if length & (length - 1) or address & (length - 1) or mask > MAX_MASK:
        raise ValueError(f"{length} bytes at {address:#x}: a watchpoint covers up to 8 bytes inside an aligned "
                         "doubleword, or a power-of-two region aligned to its size")
    return Slot(control | 0xFF << WCR_BAS_SHIFT | mask << WCR_MASK_SHIFT, address)


def covers(slot: Slot, address: int) -> bool:
    """Whether a watchpoint slot matches an access to the byte at `address`: how a stop's data
    address (FAR) is traced back to the watchpoint GDB set."""
    mask = (slot.control >> WCR_MASK_SHIFT) & 0x1F
    if mask:
        return address >> mask == slot.value >> mask
    bas = (slot.control >> WCR_BAS_SHIFT) & 0xFF
    return address & ~7 == slot.value and bool(bas >> (address & 7) & 1)

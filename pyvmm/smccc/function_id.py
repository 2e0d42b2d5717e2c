"""SMCCC function identifiers (Arm DEN0028 "SMC Calling Convention" 1.4, §2.5 and table 6-1)."""

from __future__ import annotations

from enum import IntEnum
from typing import NamedTuple

FAST_CALL = 1 << 31
SMC64 = 1 << 30
OWNER_SHIFT = 24
OWNER_MASK = 0x3F
FUNCTION_MASK = 0xFFFF

# Return codes common to all services (SMCCC §5.2)
SUCCESS = 0
NOT_SUPPORTED = -1
NOT_REQUIRED = -2
INVALID_PARAMETER = -3

# Queries every owner range answers (SMCCC §6.2): function numbers within the range
CALL_COUNT = 0xFF00
CALL_UID = 0xFF01
REVISION = 0xFF03


class Owner(IntEnum):
    ARM_ARCH = 0
    CPU = 1
    SIP = 2
    OEM = 3
    STANDARD_SECURE = 4  # PSCI, SDEI, TRNG
    STANDARD_HYP = 5
    VENDOR_HYP = 6
    # 7-47 reserved; 48-49 trusted applications; 50-63 trusted OS


class FunctionId(NamedTuple):
    fast: bool
    smc64: bool
    owner: int
    number: int

    @property
    def owner_name(self) -> str:
        if self.owner in Owner._value2member_map_:
            return Owner(self.owner).name
        if 48 <= self.owner <= 49:
            return "TRUSTED_APP"
        if 50 <= self.owner <= 63:
            return "TRUSTED_OS"
        return "RESERVED"


def decode(fid: int) -> FunctionId:
    fid &= 0xFFFF_FFFF
    return FunctionId(bool(fid & FAST_CALL), bool(fid & SMC64), (fid >> OWNER_SHIFT) & OWNER_MASK,
                      fid & FUNCTION_MASK)


def make(owner: int, number: int, *, smc64: bool = False, fast: bool = True) -> int:
    return ((FAST_CALL if fast else 0) | (SMC64 if smc64 else 0) | ((owner & OWNER_MASK) << OWNER_SHIFT)
            | (number & FUNCTION_MASK))

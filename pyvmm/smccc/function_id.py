"""SMCCC function identifiers (Arm DEN0028 "SMC Calling Convention" 1.4, §2.5 and table 6-1)."""

from __future__ import annotations

from enum import IntEnum

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


# The TRNG interface (Arm DEN0098, owner 4), which KVM answers itself when it offers it:
# TRNG_VERSION, TRNG_FEATURES, TRNG_GET_UUID, TRNG_RND (SMC32 and SMC64)
def is_id_range(base: int, count: int) -> bool:
    """[base, base + count) is a non-empty range of 32-bit function IDs."""
    return count >= 1 and 0 <= base and base + count <= 1 << 32


TRNG_FUNCTIONS = (0x8400_0050, 0x8400_0051, 0x8400_0052, 0x8400_0053, 0xC400_0053)
# PV_TIME_FEATURES and PV_TIME_ST (Arm DEN0057A, owner 5), which KVM answers itself
PV_TIME_FUNCTIONS = (0xC500_0020, 0xC500_0021)

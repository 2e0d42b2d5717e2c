"""KVM_GET/SET_ONE_REG register IDs for arm64 (Documentation/virt/kvm/api.rst, "KVM_SET_ONE_REG").

Core registers: KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE | offsetof(struct kvm_regs,
field) / 4, the offsets taken from the cffi declaration of struct kvm_regs.
System registers: KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM64_SYSREG | op0:op1:CRn:CRm:op2.
"""

from __future__ import annotations

from kvm_bindings import ffi

KVM_REG_ARM64 = 0x6000000000000000
KVM_REG_SIZE_U32 = 0x0020000000000000
KVM_REG_SIZE_U64 = 0x0030000000000000
KVM_REG_SIZE_U128 = 0x0040000000000000
KVM_REG_ARM_CORE = 0x0010 << 16
KVM_REG_ARM64_SYSREG = 0x0013 << 16
KVM_REG_ARM_FW = 0x0014 << 16

_CORE64 = KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE


def core_reg_id(field: str, size: int = KVM_REG_SIZE_U64) -> int:
    """ID of a struct kvm_regs member, e.g. "regs.pc" or "spsr[0]"."""
    return KVM_REG_ARM64 | size | KVM_REG_ARM_CORE | (_offset("struct kvm_regs", field) // 4)


def _offset(ctype: str, field: str) -> int:
    # ffi.offsetof takes "a.b" paths and integer indices as separate arguments
    parts: list[str | int] = []
    for piece in field.split("."):
        name, _, index = piece.partition("[")
        parts.append(name)
        if index:
            parts.append(int(index.rstrip("]")))
    offset: int = ffi.offsetof(ctype, *parts)
    return offset


def sysreg_id(op0: int, op1: int, crn: int, crm: int, op2: int) -> int:
    """ID of an AArch64 system register from its encoding (Arm ARM D19.2 / C5.3)."""
    return (KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM64_SYSREG | (op0 << 14) | (op1 << 11)
            | (crn << 7) | (crm << 3) | op2)


def fw_reg_id(index: int) -> int:
    """KVM-as-firmware pseudo-register (KVM_REG_ARM_FW_REG)."""
    return KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_FW | (index & 0xFFFF)


KVM_REG_ARM_PSCI_VERSION = fw_reg_id(0)

# The firmware services KVM implements itself, as bitmaps (Documentation/virt/kvm/arm/fw-pseudo-registers.rst)
KVM_REG_ARM_FW_FEAT_BMAP = 0x0016 << 16
KVM_REG_ARM_STD_BMAP = KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_FW_FEAT_BMAP | 0
KVM_REG_ARM_STD_BIT_TRNG_V1_0 = 1 << 0
KVM_REG_ARM_STD_HYP_BMAP = KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_FW_FEAT_BMAP | 1
KVM_REG_ARM_STD_HYP_BIT_PV_TIME = 1 << 0

# SVE (api.rst, KVM_REG_ARM64_SVE): the vector lengths a vCPU may use, as a bitmap of VQs (the
# length in 128-bit quadwords) in 8 64-bit words, bit VQ - 1; writable until KVM_ARM_VCPU_FINALIZE
KVM_REG_ARM64_SVE = 0x0015 << 16
KVM_REG_SIZE_U512 = 0x0060000000000000
KVM_REG_ARM64_SVE_VLS = KVM_REG_ARM64 | KVM_REG_SIZE_U512 | KVM_REG_ARM64_SVE | 0xFFFF
SVE_VLS_SIZE = 64  # bytes: KVM_REG_SIZE_U512
KVM_REG_SIZE_U2048 = 0x0080000000000000
SVE_ZREG_SIZE = 256  # bytes: each Z register slice is 2048 bits, those beyond the vector length zero


def sve_zreg_id(n: int, slice_: int = 0) -> int:
    """KVM_REG_ARM64_SVE_ZREG(n, i): slice i of Z register n."""
    return KVM_REG_ARM64 | KVM_REG_ARM64_SVE | KVM_REG_SIZE_U2048 | n << 5 | slice_
KVM_REG_SIZE_U256 = 0x0050000000000000
SVE_PREG_SIZE = 32  # bytes: P0-P15 and FFR, one bit per byte of a Z register
KVM_REG_ARM64_SVE_PREG_BASE = 0x400
KVM_REG_ARM64_SVE_FFR_BASE = 0x600


def sve_preg_id(n: int, slice_: int = 0) -> int:
    """KVM_REG_ARM64_SVE_PREG(n, i): slice i of predicate register n."""
    return KVM_REG_ARM64 | KVM_REG_ARM64_SVE | KVM_REG_ARM64_SVE_PREG_BASE | KVM_REG_SIZE_U256 | n << 5 | slice_


KVM_REG_ARM64_SVE_FFR = KVM_REG_ARM64 | KVM_REG_ARM64_SVE | KVM_REG_ARM64_SVE_FFR_BASE | KVM_REG_SIZE_U256

SVE_VQ_MAX = 512  # the architecture's limit is 16 (2048 bits); the bitmap has room for 512

# Core registers by name: x0-x30, sp (SP_EL0), pc, pstate, sp_el1, elr_el1, spsr_el1.
CORE_REGS: dict[str, int] = {f"x{n}": core_reg_id(f"regs.regs[{n}]") for n in range(31)}
CORE_REGS.update({
    "sp": core_reg_id("regs.sp"),
    "pc": core_reg_id("regs.pc"),
    "pstate": core_reg_id("regs.pstate"),
    "sp_el1": core_reg_id("sp_el1"),
    "elr_el1": core_reg_id("elr_el1"),
    "spsr_el1": core_reg_id("spsr[0]"),  # KVM_SPSR_EL1 = 0
})

# System registers by name (Arm ARM encodings) that firmware-interface work commonly needs.
SYS_REGS: dict[str, int] = {
    "mpidr_el1": sysreg_id(3, 0, 0, 0, 5),
    "midr_el1": sysreg_id(3, 0, 0, 0, 0),
    "sctlr_el1": sysreg_id(3, 0, 1, 0, 0),
    "ttbr0_el1": sysreg_id(3, 0, 2, 0, 0),
    "ttbr1_el1": sysreg_id(3, 0, 2, 0, 1),
    "tcr_el1": sysreg_id(3, 0, 2, 0, 2),
    "esr_el1": sysreg_id(3, 0, 5, 2, 0),
    "far_el1": sysreg_id(3, 0, 6, 0, 0),
    "mair_el1": sysreg_id(3, 0, 10, 2, 0),
    "vbar_el1": sysreg_id(3, 0, 12, 0, 0),
    "tpidr_el1": sysreg_id(3, 0, 13, 0, 4),
    "cntkctl_el1": sysreg_id(3, 0, 14, 1, 0),
}

# Boot PSTATE: EL1h with D, A, I, F masked (Documentation/arch/arm64/booting.rst)
PSTATE_EL1H = 0x5
PSTATE_DAIF = 0xF << 6
PSTATE_BOOT = PSTATE_DAIF | PSTATE_EL1H  # 0x3c5

# Boot PSTATE of an AArch32 EL1 (SPSR's AArch32 encoding, Arm ARM C5.2.18): Supervisor mode with
# A, I, F masked (Documentation/arch/arm/booting.rst); T selects T32, as bit 0 of a PSCI entry
# address asks (PSCI 1.1 §6.4.3.1). M[4] = 1 is what makes the state AArch32.
PSTATE_AA32_SVC = 0x13
PSTATE_AA32_AIF = 0x7 << 6
PSTATE_AA32_T = 1 << 5
PSTATE_BOOT_AA32 = PSTATE_AA32_AIF | PSTATE_AA32_SVC  # 0x1d3

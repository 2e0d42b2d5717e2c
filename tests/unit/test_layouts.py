"""Golden values: struct sizes/offsets, ioctl numbers and register IDs as the kernel headers define
them (include/uapi/linux/kvm.h and arch/arm64/include/uapi/asm/kvm.h, Linux 6.12, arm64 LP64)."""

from __future__ import annotations

import pytest

from kvm_bindings import ffi, regs
from kvm_bindings import ioctls as io
from kvm_bindings.regs import CORE_REGS, KVM_REG_SIZE_U32, KVM_REG_SIZE_U128, SYS_REGS, core_reg_id, sysreg_id

SIZES = {
    "struct kvm_run": 2352,
    "struct kvm_userspace_memory_region": 32,
    "struct kvm_vcpu_init": 32,
    "struct kvm_one_reg": 16,
    "struct kvm_device_attr": 24,
    "struct kvm_create_device": 12,
    "struct kvm_smccc_filter": 24,
    "struct kvm_guest_debug": 520,
    "struct kvm_guest_debug_arch": 512,
    "struct kvm_debug_exit_arch": 16,
    "struct kvm_irq_level": 8,
    "struct kvm_ioeventfd": 64,
    "struct kvm_irqfd": 32,
    "struct kvm_mp_state": 4,
    "struct kvm_enable_cap": 104,
    "struct kvm_regs": 864,
    "struct user_pt_regs": 272,
    "struct user_fpsimd_state": 528,
    "struct kvm_vcpu_events": 64,
    "struct kvm_reg_list": 8,
    "struct kvm_signal_mask": 4,
    "struct ifreq": 40,
    "struct vhost_vring_state": 8,
    "struct vhost_vring_file": 8,
    "struct vhost_vring_addr": 40,
    "struct vhost_memory_region": 32,
    "struct vhost_memory": 8,
}

OFFSETS = [
    ("struct kvm_run", ("immediate_exit",), 1),
    ("struct kvm_run", ("exit_reason",), 8),
    ("struct kvm_run", ("mmio", "phys_addr"), 32),
    ("struct kvm_run", ("mmio", "data"), 40),
    ("struct kvm_run", ("mmio", "len"), 48),
    ("struct kvm_run", ("mmio", "is_write"), 52),
    ("struct kvm_run", ("hypercall", "nr"), 32),
    ("struct kvm_run", ("hypercall", "args"), 40),
    ("struct kvm_run", ("hypercall", "ret"), 88),
    ("struct kvm_run", ("hypercall", "flags"), 96),
    ("struct kvm_run", ("system_event", "type"), 32),
    ("struct kvm_run", ("system_event", "ndata"), 36),
    ("struct kvm_run", ("system_event", "data"), 40),
    ("struct kvm_run", ("debug", "arch", "hsr"), 32),
    ("struct kvm_run", ("debug", "arch", "far"), 40),
    ("struct kvm_guest_debug", ("arch", "dbg_bvr"), 136),
    ("struct kvm_guest_debug", ("arch", "dbg_wvr"), 392),
    ("struct kvm_run", ("arm_nisv", "esr_iss"), 32),
    ("struct kvm_run", ("arm_nisv", "fault_ipa"), 40),
    ("struct kvm_run", ("fail_entry", "cpu"), 40),
    ("struct kvm_run", ("kvm_valid_regs",), 288),
    ("struct kvm_run", ("kvm_dirty_regs",), 296),
    ("struct kvm_run", ("s",), 304),
    ("struct kvm_regs", ("sp_el1",), 272),
    ("struct kvm_regs", ("elr_el1",), 280),
    ("struct kvm_regs", ("spsr",), 288),
    ("struct kvm_regs", ("fp_regs",), 336),
    ("struct kvm_smccc_filter", ("action",), 8),
    ("struct kvm_ioeventfd", ("fd",), 20),
    ("struct ifreq", ("ifr_flags",), 16),
    ("struct vhost_vring_addr", ("avail_user_addr",), 24),
    ("struct vhost_memory", ("regions",), 8),
    ("struct kvm_vcpu_events", ("exception", "serror_esr"), 8),
]

IOCTLS = {
    "KVM_GET_API_VERSION": 0xAE00,
    "KVM_CREATE_VM": 0xAE01,
    "KVM_CHECK_EXTENSION": 0xAE03,
    "KVM_GET_VCPU_MMAP_SIZE": 0xAE04,
    "KVM_CREATE_VCPU": 0xAE41,
    "KVM_SET_USER_MEMORY_REGION": 0x4020AE46,
    "KVM_IRQ_LINE": 0x4008AE61,
    "KVM_IRQFD": 0x4020AE76,
    "KVM_IOEVENTFD": 0x4040AE79,
    "KVM_ENABLE_CAP": 0x4068AEA3,
    "KVM_ARM_PREFERRED_TARGET": 0x8020AEAF,
    "KVM_CREATE_DEVICE": 0xC00CAEE0,
    "KVM_SET_DEVICE_ATTR": 0x4018AEE1,
    "KVM_GET_DEVICE_ATTR": 0x4018AEE2,
    "KVM_HAS_DEVICE_ATTR": 0x4018AEE3,
    "KVM_RUN": 0xAE80,
    "KVM_SET_MP_STATE": 0x4004AE99,
    "KVM_SET_GUEST_DEBUG": 0x4208AE9B,
    "KVM_GET_ONE_REG": 0x4010AEAB,
    "KVM_SET_ONE_REG": 0x4010AEAC,
    "KVM_ARM_VCPU_INIT": 0x4020AEAE,
    "KVM_GET_REG_LIST": 0xC008AEB0,
    "KVM_ARM_VCPU_FINALIZE": 0x4004AEC2,
    "TUNSETIFF": 0x400454CA,
    "TUNSETVNETHDRSZ": 0x400454D8,
    "VHOST_GET_FEATURES": 0x8008AF00,
    "VHOST_SET_FEATURES": 0x4008AF00,
    "VHOST_SET_OWNER": 0xAF01,
    "VHOST_SET_MEM_TABLE": 0x4008AF03,
    "VHOST_SET_VRING_NUM": 0x4008AF10,
    "VHOST_SET_VRING_ADDR": 0x4028AF11,
    "VHOST_SET_VRING_BASE": 0x4008AF12,
    "VHOST_GET_VRING_BASE": 0xC008AF12,
    "VHOST_SET_VRING_KICK": 0x4008AF20,
    "VHOST_SET_VRING_CALL": 0x4008AF21,
    "VHOST_NET_SET_BACKEND": 0x4008AF30,
    "VHOST_VSOCK_SET_GUEST_CID": 0x4008AF60,
    "VHOST_VSOCK_SET_RUNNING": 0x4004AF61,
}


@pytest.mark.parametrize(("ctype", "size"), SIZES.items())
def test_struct_sizes(ctype: str, size: int) -> None:
    assert ffi.sizeof(ctype) == size


@pytest.mark.parametrize(("ctype", "path", "offset"), OFFSETS)
def test_struct_offsets(ctype: str, path: tuple[str, ...], offset: int) -> None:
    assert ffi.offsetof(ctype, *path) == offset


@pytest.mark.parametrize(("name", "number"), IOCTLS.items())
def test_ioctl_numbers(name: str, number: int) -> None:
    assert getattr(io, name) == number
    assert io.NAMES[number] == name


def test_core_register_ids() -> None:
    base = 0x6030_0000_0010_0000
    assert CORE_REGS["x0"] == base
    assert CORE_REGS["x30"] == base + 60
    assert CORE_REGS["sp"] == base + 0x3E
    assert CORE_REGS["pc"] == base + 0x40
    assert CORE_REGS["pstate"] == base + 0x42
    assert CORE_REGS["sp_el1"] == base + 0x44
    assert CORE_REGS["elr_el1"] == base + 0x46
    assert CORE_REGS["spsr_el1"] == base + 0x48
    assert core_reg_id("fp_regs.vregs[0]", KVM_REG_SIZE_U128) == 0x6040_0000_0010_0054
    assert core_reg_id("fp_regs.fpsr", KVM_REG_SIZE_U32) == 0x6020_0000_0010_00D4
    assert core_reg_id("fp_regs.fpcr", KVM_REG_SIZE_U32) == 0x6020_0000_0010_00D5


def test_system_register_ids() -> None:
    assert SYS_REGS["mpidr_el1"] == 0x6030_0000_0013_C005 == sysreg_id(3, 0, 0, 0, 5)
    assert SYS_REGS["vbar_el1"] == 0x6030_0000_0013_C600
    assert sysreg_id(3, 3, 14, 0, 2) == 0x6030_0000_0013_DF02  # CNTVCT_EL0 encoding


def test_firmware_and_sve_register_ids() -> None:
    # arch/arm64/include/uapi/asm/kvm.h: KVM_REG_ARM_STD_HYP_BMAP, KVM_REG_ARM64_SVE_VLS
    assert regs.KVM_REG_ARM_STD_HYP_BMAP == 0x6030_0000_0016_0001
    assert regs.KVM_REG_ARM64_SVE_VLS == 0x6060_0000_0015_FFFF

"""Named constants of the KVM UAPI (include/uapi/linux/kvm.h, arch/arm64/include/uapi/asm/kvm.h)."""

from __future__ import annotations

from enum import IntEnum, IntFlag

KVM_API_VERSION = 12


class ExitReason(IntEnum):
    UNKNOWN = 0
    EXCEPTION = 1
    IO = 2
    HYPERCALL = 3
    DEBUG = 4
    HLT = 5
    MMIO = 6
    IRQ_WINDOW_OPEN = 7
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTR = 10
    INTERNAL_ERROR = 17
    SYSTEM_EVENT = 24
    ARM_NISV = 28


class Cap(IntEnum):
    """KVM_CAP_* numbers pyvmm checks or enables."""

    IRQCHIP = 0
    USER_MEMORY = 3
    NR_VCPUS = 9
    NR_MEMSLOTS = 10
    MP_STATE = 14
    SET_GUEST_DEBUG = 23
    IRQFD = 32
    IOEVENTFD = 36
    VCPU_EVENTS = 41
    MAX_VCPUS = 66
    ONE_REG = 70
    READONLY_MEM = 81
    ARM_PSCI = 87
    ARM_EL1_32BIT = 93
    DEVICE_CTRL = 89
    ARM_PSCI_0_2 = 102
    GUEST_DEBUG_HW_BPS = 119
    GUEST_DEBUG_HW_WPS = 120
    ARM_PMU_V3 = 126
    IMMEDIATE_EXIT = 136
    ARM_VM_IPA_SIZE = 165
    ARM_SVE = 170
    ARM_PTRAUTH_ADDRESS = 171
    ARM_PTRAUTH_GENERIC = 172
    ARM_NISV_TO_USER = 177
    ARM_INJECT_EXT_DABT = 178
    STEAL_TIME = 187
    ARM_MTE = 205
    ARM_SYSTEM_SUSPEND = 216


# KVM_SET_GUEST_DEBUG's control bits: the generic ones (linux/kvm.h) and arm64's (asm/kvm.h)
KVM_GUESTDBG_ENABLE = 1 << 0
KVM_GUESTDBG_SINGLESTEP = 1 << 1
KVM_GUESTDBG_USE_SW_BP = 1 << 16
KVM_GUESTDBG_USE_HW = 1 << 17


class SystemEvent(IntEnum):
    SHUTDOWN = 1
    RESET = 2
    CRASH = 3
    WAKEUP = 4
    SUSPEND = 5


KVM_SYSTEM_EVENT_RESET_FLAG_PSCI_RESET2 = 1 << 0


class MpState(IntEnum):
    RUNNABLE = 0
    STOPPED = 5
    SUSPENDED = 10


class VcpuFeature(IntEnum):
    """Bit numbers in kvm_vcpu_init.features[0]."""

    POWER_OFF = 0
    EL1_32BIT = 1
    PSCI_0_2 = 2
    PMU_V3 = 3
    SVE = 4
    PTRAUTH_ADDRESS = 5
    PTRAUTH_GENERIC = 6


class DeviceType(IntEnum):
    """enum kvm_device_type values for KVM_CREATE_DEVICE."""

    ARM_VGIC_V2 = 5
    ARM_VGIC_V3 = 7
    ARM_VGIC_ITS = 8


class SmcccFilterAction(IntEnum):
    """enum kvm_smccc_filter_action (Documentation/virt/kvm/devices/vm.rst)."""

    HANDLE = 0
    DENY = 1
    FWD_TO_USER = 2


class HypercallExitFlag(IntFlag):
    """arm64 kvm_run.hypercall.flags."""

    SMC = 1 << 0
    BIT16 = 1 << 1  # KVM_HYPERCALL_EXIT_16BIT: the call was a 16-bit (T32) instruction


# KVM_HAS/SET_DEVICE_ATTR on the VM fd: group and attribute of the SMCCC filter
KVM_ARM_VM_SMCCC_CTRL = 0
KVM_ARM_VM_SMCCC_FILTER = 0

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
KVM_CREATE_DEVICE_TEST = 1
KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2
KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE = 1 << 1

# TUNSETIFF flags (include/uapi/linux/if_tun.h)
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000

# openat2(2): its number is the same on every architecture (include/uapi/asm-generic/unistd.h),
# and the resolve flags (include/uapi/linux/openat2.h)
SYS_OPENAT2 = 437
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08

# KVM_IRQ_LINE irq field layout on arm64 (Documentation/virt/kvm/api.rst, KVM_IRQ_LINE)
KVM_ARM_IRQ_TYPE_SHIFT = 24
KVM_ARM_IRQ_VCPU_SHIFT = 16
KVM_ARM_IRQ_VCPU2_SHIFT = 28
KVM_ARM_IRQ_TYPE_CPU = 0
KVM_ARM_IRQ_TYPE_SPI = 1
KVM_ARM_IRQ_TYPE_PPI = 2

# vGIC device attribute groups (arch/arm64/include/uapi/asm/kvm.h)
KVM_DEV_ARM_VGIC_GRP_ADDR = 0
KVM_DEV_ARM_VGIC_GRP_DIST_REGS = 1
KVM_DEV_ARM_VGIC_GRP_CPU_REGS = 2  # GICv2 CPU interface
KVM_DEV_ARM_VGIC_GRP_NR_IRQS = 3
KVM_DEV_ARM_VGIC_GRP_CTRL = 4
KVM_DEV_ARM_VGIC_GRP_REDIST_REGS = 5
KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS = 6  # GICv3 ICC_* registers
KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO = 7
KVM_DEV_ARM_VGIC_CTRL_INIT = 0
KVM_DEV_ARM_ITS_CTRL_RESET = 4  # an ITS device: back to its state after CTRL_INIT (arm-vgic-its.rst)
KVM_VGIC_V2_ADDR_TYPE_DIST = 0
KVM_VGIC_V2_ADDR_TYPE_CPU = 1
KVM_VGIC_V3_ADDR_TYPE_DIST = 2
KVM_VGIC_V3_ADDR_TYPE_REDIST = 3
KVM_VGIC_ITS_ADDR_TYPE = 4
KVM_VGIC_V3_ITS_SIZE = 2 * 0x1_0000  # the ITS control frame and the doorbell's translation frame

# vCPU device attributes (Documentation/virt/kvm/devices/vcpu.rst)
KVM_ARM_VCPU_PMU_V3_CTRL = 0
KVM_ARM_VCPU_PMU_V3_IRQ = 0
KVM_ARM_VCPU_PMU_V3_INIT = 1
KVM_ARM_VCPU_PVTIME_CTRL = 2
KVM_ARM_VCPU_PVTIME_IPA = 0

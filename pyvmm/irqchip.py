"""The in-kernel interrupt controller: a vGICv3, or a vGICv2 where that is all the host offers.

Addresses follow kvmtool's arm64 layout (arm/include/arm-common/kvm-arch.h), so guests built
for kvmtool find the GIC where they expect it: the distributor in the 64 KiB below 0x40000000,
GICv3 redistributors (128 KiB per vCPU) or the GICv2 CPU interface (128 KiB) right below it.
Set-up order (Documentation/virt/kvm/devices/arm-vgic-v3.rst): create the device, place its
regions, then KVM_DEV_ARM_VGIC_CTRL_INIT once every vCPU exists.
"""

from __future__ import annotations

import errno

from kvm_bindings.constants import (
    KVM_DEV_ARM_VGIC_CTRL_INIT,
    KVM_DEV_ARM_VGIC_GRP_ADDR,
    KVM_DEV_ARM_VGIC_GRP_CTRL,
    KVM_DEV_ARM_VGIC_GRP_NR_IRQS,
    KVM_VGIC_V2_ADDR_TYPE_CPU,
    KVM_VGIC_V2_ADDR_TYPE_DIST,
    KVM_VGIC_V3_ADDR_TYPE_DIST,
    KVM_VGIC_V3_ADDR_TYPE_REDIST,
    DeviceType,
)
from pyvmm.errors import KvmIoctlError, KvmUnavailableError
from pyvmm.kvm import VmFd

GIC_DIST_BASE = 0x4000_0000 - 0x1_0000
GIC_DIST_SIZE = 0x1_0000
GIC_REDIST_SIZE = 0x2_0000  # per vCPU: RD_base + SGI_base frames
GIC_CPUI_SIZE = 0x2_0000
GICV2_MAX_VCPUS = 8
NR_IRQS = 256  # SGIs, PPIs and 224 SPIs; a multiple of 32 (vgic: KVM_DEV_ARM_VGIC_GRP_NR_IRQS)
SPI_BASE = 32

# Arch timer PPIs as INTIDs (DT "arm,armv8-timer" lists them as PPIs 13, 14, 11, 10)
TIMER_PPIS = {"secure-phys": 13, "phys": 14, "virt": 11, "hyp-phys": 10}


class Gic:
    def __init__(self, vm_fd: VmFd, nr_vcpus: int) -> None:
        self.nr_vcpus = nr_vcpus
        self.dist_base = GIC_DIST_BASE
        try:
            self.dev = vm_fd.create_device(DeviceType.ARM_VGIC_V3)
            self.version = 3
        except KvmIoctlError as e:
            if e.errno not in (errno.ENODEV, errno.ENXIO, errno.EINVAL):
                raise
            if nr_vcpus > GICV2_MAX_VCPUS:
                raise KvmUnavailableError(
                    f"this host's KVM offers only a GICv2, which serves at most {GICV2_MAX_VCPUS} vCPUs, "
                    f"not {nr_vcpus}") from None
            self.dev = vm_fd.create_device(DeviceType.ARM_VGIC_V2)
            self.version = 2
        assert self.dev is not None
        if self.version == 3:
            self.redist_size = GIC_REDIST_SIZE * nr_vcpus
            self.redist_base = self.dist_base - self.redist_size
            regions = ((KVM_VGIC_V3_ADDR_TYPE_DIST, self.dist_base), (KVM_VGIC_V3_ADDR_TYPE_REDIST, self.redist_base))
        else:
            self.cpu_base = self.dist_base - GIC_CPUI_SIZE
            regions = ((KVM_VGIC_V2_ADDR_TYPE_DIST, self.dist_base), (KVM_VGIC_V2_ADDR_TYPE_CPU, self.cpu_base))
        for kind, base in regions:
            self.dev.set_device_attr_u64(KVM_DEV_ARM_VGIC_GRP_ADDR, kind, base, f"GIC region {kind} at {base:#x}")

    @property
    def regions(self) -> list[tuple[int, int, str]]:
        """(base, size, name) of every MMIO region KVM emulates for this GIC."""
        if self.version == 3:
            return [(self.dist_base, GIC_DIST_SIZE, "gic-dist"), (self.redist_base, self.redist_size, "gic-redist")]
        return [(self.dist_base, GIC_DIST_SIZE, "gic-dist"), (self.cpu_base, GIC_CPUI_SIZE, "gic-cpu")]

    def finalize(self) -> None:
        """After every vCPU is created: fix the number of IRQs and initialise the vGIC."""
        self.dev.set_device_attr_u32(KVM_DEV_ARM_VGIC_GRP_NR_IRQS, 0, NR_IRQS, "GIC NR_IRQS")
        self.dev.set_device_attr(KVM_DEV_ARM_VGIC_GRP_CTRL, KVM_DEV_ARM_VGIC_CTRL_INIT, 0, "GIC CTRL_INIT")

    def close(self) -> None:
        self.dev.close()


class InKernelRegion:
    """Placeholder on the MMIO bus for a region KVM emulates: it never reaches userspace, and the
    bus entry keeps RAM and devices from overlapping it."""

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        pass

"""The in-kernel interrupt controller: a vGICv3, or a vGICv2 where that is all the host offers.

Addresses follow kvmtool's arm64 layout (arm/include/arm-common/kvm-arch.h), so guests built
for kvmtool find the GIC where they expect it: the distributor in the 64 KiB below 0x40000000,
GICv3 redistributors (128 KiB per vCPU) or the GICv2 CPU interface (128 KiB) right below it.
Set-up order (Documentation/virt/kvm/devices/arm-vgic-v3.rst): create the device, place its
regions, then KVM_DEV_ARM_VGIC_CTRL_INIT once every vCPU exists. An ITS (kvmtool's
--irqchip=gicv3-its; devices/arm-vgic-its.rst) is its own device: its 128 KiB go right below the
redistributors, and it is initialised as soon as it is placed, before the vGIC, as kvmtool does.

Reset: KVM_ARM_VCPU_INIT resets a vCPU's registers, timer and PMU, but no vGIC state
(arch/arm64/kvm/reset.c, kvm_reset_vcpu): enables, pending and active bits, priorities, groups
and the CPU interface (ICH_VMCR, active priorities) survive it. `reset()` writes them back to
what KVM_DEV_ARM_VGIC_CTRL_INIT leaves (arch/arm64/kvm/vgic/vgic-init.c: every priority 0,
SGIs enabled and edge, PPIs and SPIs disabled, SPIs edge and routed to vCPU 0, group 1 on a
GICv3 and 0 on a GICv2, distributor off), through the register groups of arm-vgic-v3.rst and
arm-vgic.rst. The CPU interface registers are read once after initialisation and written back.
With an ITS, the ITS is reset too (KVM_DEV_ARM_ITS_CTRL_RESET) and every redistributor's LPIs are
turned off and their tables forgotten (GICR_CTLR.EnableLPIs, GICR_PROPBASER, GICR_PENDBASER).
Every vCPU must be out of KVM_RUN (else EBUSY).
"""

from __future__ import annotations

import errno
from collections.abc import Callable

from kvm_bindings.constants import (
    KVM_DEV_ARM_ITS_CTRL_RESET,
    KVM_DEV_ARM_VGIC_CTRL_INIT,
    KVM_DEV_ARM_VGIC_GRP_ADDR,
    KVM_DEV_ARM_VGIC_GRP_CPU_REGS,
    KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS,
    KVM_DEV_ARM_VGIC_GRP_CTRL,
    KVM_DEV_ARM_VGIC_GRP_DIST_REGS,
    KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO,
    KVM_DEV_ARM_VGIC_GRP_NR_IRQS,
    KVM_DEV_ARM_VGIC_GRP_REDIST_REGS,
    KVM_VGIC_ITS_ADDR_TYPE,
    KVM_VGIC_V2_ADDR_TYPE_CPU,
    KVM_VGIC_V2_ADDR_TYPE_DIST,
    KVM_VGIC_V3_ADDR_TYPE_DIST,
    KVM_VGIC_V3_ADDR_TYPE_REDIST,
    KVM_VGIC_V3_ITS_SIZE,
    DeviceType,
)
from pyvmm.errors import KvmIoctlError, KvmUnavailableError, VmmError
from pyvmm.kvm.fds import DeviceFd, VmFd
from pyvmm.machine.irq_lines import NR_IRQS, SPI_BASE

GIC_DIST_BASE = 0x4000_0000 - 0x1_0000
GIC_DIST_SIZE = 0x1_0000
GIC_REDIST_SIZE = 0x2_0000  # per vCPU: RD_base + SGI_base frames
GIC_CPUI_SIZE = 0x2_0000
GICV2_MAX_VCPUS = 8

# Distributor registers (GIC architecture spec IHI 0069, §12.9; the GICv2 ones at the same offsets)
GICD_CTLR, GICD_IIDR = 0x000, 0x008
GICD_IGROUPR, GICD_ISENABLER, GICD_ICENABLER = 0x080, 0x100, 0x180
GICD_ISPENDR, GICD_ICPENDR, GICD_ICACTIVER = 0x200, 0x280, 0x380
GICD_IPRIORITYR, GICD_ITARGETSR, GICD_ICFGR = 0x400, 0x800, 0xC00
GICD_CPENDSGIR = 0xF10  # GICv2
GICD_IROUTER = 0x6000  # GICv3, 8 bytes per INTID
GICR_CTLR, GICR_PROPBASER, GICR_PENDBASER = 0x000, 0x070, 0x078  # a redistributor's LPI set-up
GICR_SGI_BASE = 0x1_0000  # a GICv3 redistributor's SGI frame, where its SGI/PPI registers live
ALL = 0xFFFF_FFFF
SGIS = 0xFFFF  # INTIDs 0-15
EDGE = 0xAAAA_AAAA  # GICD_ICFGR: Int_config[1] set for each of 16 interrupts, edge-triggered
# GICv3 CPU interface: ICC_*_EL1 as op0:op1:CRn:CRm:op2 (KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS)
ICC_PMR, ICC_BPR0, ICC_BPR1, ICC_CTLR = 0xC230, 0xC643, 0xC663, 0xC664
ICC_IGRPEN0, ICC_IGRPEN1 = 0xC666, 0xC667
ICC_AP0R, ICC_AP1R = 0xC644, 0xC648  # ..3 each; how many exist follows ICC_CTLR.PRIbits
ICC_CTLR_CBPR_EOIMODE = 0b11
# GICv2 CPU interface (KVM_DEV_ARM_VGIC_GRP_CPU_REGS): CTLR, PMR, BPR, ABPR, APR0
GICC_REGS = (0x00, 0x04, 0x08, 0x1C, 0xD0)


IRQCHIPS = ("auto", "gicv2", "gicv3", "gicv3-its")  # kvmtool's --irqchip, less its userspace GICv2m


class Gic:
    def __init__(self, vm_fd: VmFd, nr_vcpus: int, irqchip: str = "auto") -> None:
        """`irqchip`: "auto" (as kvmtool's: a vGICv3 with an ITS, else a vGICv3, else a vGICv2;
        arm/gic.c, gic__create), or the one of IRQCHIPS asked for."""
        if irqchip not in IRQCHIPS:
            raise VmmError(f"the interrupt controller is one of {', '.join(IRQCHIPS)}, not {irqchip!r}")
        self.nr_vcpus = nr_vcpus
        self._mpidrs: list[int] = []
        self._cpu_regs: list[dict[int, int]] = []  # each CPU interface's registers after init
        self.dist_base = GIC_DIST_BASE
        self.its_base: int | None = None
        self._its: DeviceFd | None = None
        self.dev, self.version = self._create(vm_fd, nr_vcpus, irqchip)
        if self.version == 3:
            self.redist_size = GIC_REDIST_SIZE * nr_vcpus
            self.redist_base = self.dist_base - self.redist_size
            regions = ((KVM_VGIC_V3_ADDR_TYPE_DIST, self.dist_base), (KVM_VGIC_V3_ADDR_TYPE_REDIST, self.redist_base))
        else:
            self.cpu_base = self.dist_base - GIC_CPUI_SIZE
            regions = ((KVM_VGIC_V2_ADDR_TYPE_DIST, self.dist_base), (KVM_VGIC_V2_ADDR_TYPE_CPU, self.cpu_base))
        try:
            for kind, base in regions:
                self.dev.set_device_attr_u64(KVM_DEV_ARM_VGIC_GRP_ADDR, kind, base, f"GIC region {kind} at {base:#x}")
            if irqchip == "gicv3-its" or (irqchip == "auto" and self.version == 3
                                          and vm_fd.can_create_device(DeviceType.ARM_VGIC_ITS)):
                self._add_its(vm_fd)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _create(vm_fd: VmFd, nr_vcpus: int, irqchip: str) -> tuple[DeviceFd, int]:
        """The vGIC device and its version: the one asked for, or a v3 where KVM has one, else a v2."""
        missing = (errno.ENODEV, errno.ENXIO, errno.EINVAL)  # what KVM_CREATE_DEVICE says of a type it lacks
        if irqchip != "gicv2":
            try:
                return vm_fd.create_device(DeviceType.ARM_VGIC_V3), 3
            except KvmIoctlError as e:
                if e.errno not in missing:
                    raise
                if irqchip != "auto":
                    raise KvmUnavailableError(f"--irqchip={irqchip}: this host's KVM offers no vGICv3") from None
        if nr_vcpus > GICV2_MAX_VCPUS:
            which = "a vGICv2 (--irqchip=gicv2)" if irqchip == "gicv2" else "this host's KVM offers only a GICv2, which"
            raise KvmUnavailableError(f"{which} serves at most {GICV2_MAX_VCPUS} vCPUs, not {nr_vcpus}")
        try:
            return vm_fd.create_device(DeviceType.ARM_VGIC_V2), 2
        except KvmIoctlError as e:
            if irqchip == "gicv2" and e.errno in missing:
                raise KvmUnavailableError("--irqchip=gicv2: this host's KVM offers no vGICv2 (its GIC has no "
                                          "GICv2 compatibility)") from None
            raise

    def _add_its(self, vm_fd: VmFd) -> None:
        if not vm_fd.can_create_device(DeviceType.ARM_VGIC_ITS):
            raise KvmUnavailableError("--irqchip=gicv3-its: this host's KVM offers no ITS (KVM_DEV_TYPE_ARM_VGIC_ITS)")
        self._its = vm_fd.create_device(DeviceType.ARM_VGIC_ITS)
        self.its_base = self.redist_base - KVM_VGIC_V3_ITS_SIZE
        self._its.set_device_attr_u64(KVM_DEV_ARM_VGIC_GRP_ADDR, KVM_VGIC_ITS_ADDR_TYPE, self.its_base,
                                      f"ITS at {self.its_base:#x}")
        self._its.set_device_attr(KVM_DEV_ARM_VGIC_GRP_CTRL, KVM_DEV_ARM_VGIC_CTRL_INIT, 0, "ITS CTRL_INIT")

    @property
    def mmio_regions(self) -> list[tuple[int, int, str]]:
        """(base, size, name) of every MMIO region KVM emulates: the GIC's and its ITS's."""
        its = [] if self.its_region is None else [(*self.its_region, "gic-its")]
        return self.regions + its

    @property
    def its_region(self) -> tuple[int, int] | None:
        """(base, size) of the ITS, if there is one (its DT node's reg)."""
        return None if self.its_base is None else (self.its_base, KVM_VGIC_V3_ITS_SIZE)

    @property
    def regions(self) -> list[tuple[int, int, str]]:
        """(base, size, name) of the GIC's own regions (its DT node's reg)."""
        if self.version == 3:
            return [(self.dist_base, GIC_DIST_SIZE, "gic-dist"), (self.redist_base, self.redist_size, "gic-redist")]
        return [(self.dist_base, GIC_DIST_SIZE, "gic-dist"), (self.cpu_base, GIC_CPUI_SIZE, "gic-cpu")]

    def finalize(self, mpidrs: list[int]) -> None:
        """After every vCPU is created: fix the number of IRQs, initialise the vGIC, and note
        each CPU interface's initial registers for reset()."""
        self.dev.set_device_attr_u32(KVM_DEV_ARM_VGIC_GRP_NR_IRQS, 0, NR_IRQS, "GIC NR_IRQS")
        self.dev.set_device_attr(KVM_DEV_ARM_VGIC_GRP_CTRL, KVM_DEV_ARM_VGIC_CTRL_INIT, 0, "GIC CTRL_INIT")
        self._mpidrs = mpidrs
        if self.version == 3:
            self._cpu_regs = [self._icc_snapshot(_v3_affinity(m)) for m in mpidrs]
        else:
            self._cpu_regs = [{off: self.dev.get_device_attr_u32(KVM_DEV_ARM_VGIC_GRP_CPU_REGS, cpu << 32 | off)
                               for off in GICC_REGS} for cpu in range(len(mpidrs))]

    def _icc_snapshot(self, aff: int) -> dict[int, int]:
        get = self.dev.get_device_attr_u64
        regs = {reg: get(KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS, aff | reg) for reg in
                (ICC_CTLR, ICC_PMR, ICC_BPR0, ICC_BPR1, ICC_IGRPEN0, ICC_IGRPEN1)}
        regs[ICC_CTLR] &= ~ICC_CTLR_CBPR_EOIMODE  # only these two bits are written back (vgic-sys-reg-v3.c)
        pri_bits = (regs[ICC_CTLR] >> 8 & 7) + 1
        aprs = 4 if pri_bits >= 7 else 2 if pri_bits == 6 else 1  # vgic_v3_max_apr_idx
        for n in range(aprs):
            regs[ICC_AP0R + n] = get(KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS, aff | (ICC_AP0R + n))
            regs[ICC_AP1R + n] = get(KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS, aff | (ICC_AP1R + n))
        return regs

    def reset(self) -> None:
        """Back to the state after finalize(): nothing enabled (SGIs aside), pending or active,
        default priorities, groups, configuration and routing; CPU interfaces as they were."""
        if self.version == 3:
            self._reset_v3()
        else:
            self._reset_v2()

    def _reset_v3(self) -> None:
        if self._its is not None:
            # the ITS first, so that it translates nothing more: disabled, its command queue and
            # tables forgotten (arm-vgic-its.rst, KVM_DEV_ARM_ITS_CTRL_RESET); then each
            # redistributor's LPIs below
            self._its.set_device_attr(KVM_DEV_ARM_VGIC_GRP_CTRL, KVM_DEV_ARM_ITS_CTRL_RESET, 0, "ITS reset")
        dist = self._writer(KVM_DEV_ARM_VGIC_GRP_DIST_REGS, 0)
        dist(GICD_CTLR, 0)
        for word in range(SPI_BASE // 32, NR_IRQS // 32):  # distributor: the SPIs
            at = 4 * word
            dist(GICD_ICENABLER + at, ALL)
            dist(GICD_ICACTIVER + at, ALL)
            dist(GICD_ISPENDR + at, 0)  # from userspace ISPENDR sets the pending latch to the value
            dist(GICD_IGROUPR + at, ALL)
            for k in range(2):
                dist(GICD_ICFGR + 2 * at + 4 * k, EDGE)
            for k in range(8):
                dist(GICD_IPRIORITYR + 8 * at + 4 * k, 0)
            self.dev.set_device_attr_u32(KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO, 32 * word, 0, "GIC LEVEL_INFO")
        for intid in range(SPI_BASE, NR_IRQS):
            dist(GICD_IROUTER + 8 * intid, 0)  # the low half: Aff2..Aff0 = vCPU 0
        for mpidr, icc in zip(self._mpidrs, self._cpu_regs, strict=True):
            aff = _v3_affinity(mpidr)
            redist = self._writer(KVM_DEV_ARM_VGIC_GRP_REDIST_REGS, aff)
            if self._its is not None:  # LPIs off, then their tables (writable only with LPIs off)
                redist(GICR_CTLR, 0)
                for half in (GICR_PROPBASER, GICR_PROPBASER + 4, GICR_PENDBASER, GICR_PENDBASER + 4):
                    redist(half, 0)
            redist(GICR_SGI_BASE + GICD_ICENABLER, ALL)
            redist(GICR_SGI_BASE + GICD_ISENABLER, SGIS)
            redist(GICR_SGI_BASE + GICD_ICACTIVER, ALL)
            redist(GICR_SGI_BASE + GICD_ISPENDR, 0)
            redist(GICR_SGI_BASE + GICD_IGROUPR, ALL)
            for k in range(8):
                redist(GICR_SGI_BASE + GICD_IPRIORITYR + 4 * k, 0)
            for reg, value in icc.items():  # ICC_CTLR first: BPR1 is kept only with CBPR clear
                self.dev.set_device_attr_u64(KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS, aff | reg, value, "GIC ICC")

    def _reset_v2(self) -> None:
        dist = self._writer(KVM_DEV_ARM_VGIC_GRP_DIST_REGS, 0)
        # IGROUPR is writable from userspace only once GICD_IIDR has been (vgic-mmio-v2.c)
        dist(GICD_IIDR, self.dev.get_device_attr_u32(KVM_DEV_ARM_VGIC_GRP_DIST_REGS, GICD_IIDR))
        dist(GICD_CTLR, 0)
        for word in range(SPI_BASE // 32, NR_IRQS // 32):
            at = 4 * word
            for reg, value in ((GICD_ICENABLER, ALL), (GICD_ICPENDR, ALL), (GICD_ICACTIVER, ALL),
                               (GICD_IGROUPR, 0)):
                dist(reg + at, value)
            for k in range(2):
                dist(GICD_ICFGR + 2 * at + 4 * k, EDGE)
            for k in range(8):
                dist(GICD_IPRIORITYR + 8 * at + 4 * k, 0)
                dist(GICD_ITARGETSR + 8 * at + 4 * k, 0)
        for cpu, gicc in enumerate(self._cpu_regs):
            banked = self._writer(KVM_DEV_ARM_VGIC_GRP_DIST_REGS, cpu << 32)
            for reg, value in ((GICD_ICENABLER, ALL), (GICD_ISENABLER, SGIS), (GICD_ICPENDR, ALL),
                               (GICD_ICACTIVER, ALL), (GICD_IGROUPR, 0)):
                banked(reg, value)
            for k in range(8):
                banked(GICD_IPRIORITYR + 4 * k, 0)
            for k in range(4):
                banked(GICD_CPENDSGIR + 4 * k, ALL)
            for off, value in gicc.items():
                self.dev.set_device_attr_u32(KVM_DEV_ARM_VGIC_GRP_CPU_REGS, cpu << 32 | off, value, "GICC")

    def _writer(self, group: int, high: int) -> Callable[[int, int], None]:
        def write(offset: int, value: int) -> None:
            self.dev.set_device_attr_u32(group, high | offset, value, f"GIC register {offset:#x}")
        return write

    def close(self) -> None:
        if self._its is not None:
            self._its.close()
        self.dev.close()


def _v3_affinity(mpidr: int) -> int:
    """An MPIDR as the attr's bits 63:32 (Aff3 63:56, Aff2 55:48, Aff1 47:40, Aff0 39:32)."""
    return ((mpidr >> 32 & 0xFF) << 56) | ((mpidr & 0xFF_FFFF) << 32)


class InKernelRegion:
    """Placeholder on the MMIO bus for a region KVM emulates: it never reaches userspace, and the
    bus entry keeps RAM and devices from overlapping it."""

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        pass

"""The host's shape as pyvmm meets it: the interrupt controller KVM can give a guest, the page
size, the guest-physical address size, the SMCCC filter, the vCPU limit. Real arm64 machines
differ in each (a Raspberry Pi's GIC-400 gives only a vGICv2; Asahi Linux runs 16K pages;
Linux before 6.4 has no SMCCC filter), and `pyvmm check` says in words what that means.

`probe()` asks KVM; everything else here is a pure function of the values, so tests can give
each shape's values without such a host. The VM imports this module as it starts: it stays
light (a NamedTuple, not a dataclass, which would import `inspect`).
"""

from __future__ import annotations

import mmap
import os
from typing import TYPE_CHECKING, NamedTuple

from kvm_bindings.constants import Cap, DeviceType, VcpuFeature
from pyvmm.errors import VmmError
from pyvmm.machine.cpu_features import NEEDS, longest_vector
from pyvmm.smccc.filter import MIN_KERNEL_TEXT

if TYPE_CHECKING:
    from pyvmm.kvm.fds import VmFd

DEFAULT_IPA_BITS = 40  # what KVM_CREATE_VM's machine type 0 means (api.rst, KVM_CREATE_VM)
MIN_IPA_BITS = 32  # the smallest size KVM accepts in the machine type (KVM_VM_TYPE_ARM_IPA_SIZE)
PYVMM_IPA_BITS = 48  # pyvmm places RAM below 2**48 (no FEAT_LPA), whatever KVM offers (pyvmm/machine/memory.py)

HOST_NOTES = "pyvmm.machine.host"  # the logger of what a host's shape means for its guests (pyvmm exec mutes it)


class HostShape(NamedTuple):
    kernel: str  # uname release
    gic: int | None  # the newest vGIC KVM can create: 3, 2, or None
    page_size: int
    max_ipa_bits: int  # KVM_CAP_ARM_VM_IPA_SIZE; 0 if KVM cannot choose (then 40 bits, fixed)
    smccc_filter: bool
    max_vcpus: int
    nisv_to_user: bool  # KVM_CAP_ARM_NISV_TO_USER: MMIO it cannot decode reaches pyvmm
    guest_debug: bool
    hw_breakpoints: int
    hw_watchpoints: int
    its: bool = False  # a vGICv3 ITS (--irqchip=gicv3-its)
    cpu: tuple[str, ...] = ()  # the optional CPU features KVM offers (pyvmm/machine/cpu_features.py NEEDS)
    sve_max_vl: int = 0  # bits: SVE's longest vector here, 0 without SVE
    vhost_net: bool = False  # /dev/vhost-net opens: tap NICs get the kernel's data plane
    vhost_vsock: bool = False  # /dev/vhost-vsock opens: --vsock works


def vm_ipa_bits(ram_end: int, max_ipa_bits: int) -> int:
    """The machine type's IPA size for a VM whose RAM ends at `ram_end` (exclusive): 0 (KVM's
    40-bit default) where that fits and the host offers it, else the smallest size that holds
    the RAM. A VmmError names what is missing when the host cannot hold it."""
    needed = max(MIN_IPA_BITS, (ram_end - 1).bit_length())
    if max_ipa_bits == 0:  # an old KVM: 40 bits, no choice
        if needed > DEFAULT_IPA_BITS:
            raise VmmError(f"RAM up to {ram_end:#x} needs {needed}-bit guest physical addresses; this KVM "
                           f"gives {DEFAULT_IPA_BITS} bits and cannot give more")
        return 0
    if needed > max_ipa_bits:
        raise VmmError(f"RAM up to {ram_end:#x} needs {needed}-bit guest physical addresses; this host's KVM "
                       f"gives at most {max_ipa_bits} (KVM_CAP_ARM_VM_IPA_SIZE): give less memory (-m)")
    # the default wherever it is within the host's limit (some kernels warn when it is not)
    return 0 if needed <= DEFAULT_IPA_BITS <= max_ipa_bits else needed


def probe_ipa_bits(max_ipa_bits: int) -> int:
    """The machine type of a throwaway VM that asks KVM questions: the default 40 bits where the
    host offers them, else its largest size (KVM refuses type 0 on a host of fewer than 40 bits,
    arch/arm64/kvm/mmu.c kvm_init_stage2_mmu)."""
    return 0 if max_ipa_bits == 0 or max_ipa_bits >= DEFAULT_IPA_BITS else max_ipa_bits


def probe(kvm_path: str = "/dev/kvm") -> HostShape:
    """Ask this host's KVM (a throwaway VM for the VM-level questions)."""
    from pyvmm.kvm.fds import Kvm
    from pyvmm.smccc import filter as smccc_filter

    kvm = Kvm(kvm_path)
    try:
        vm = kvm.create_vm(probe_ipa_bits(kvm.check_extension(Cap.ARM_VM_IPA_SIZE)))
        try:
            gic = 3 if vm.can_create_device(DeviceType.ARM_VGIC_V3) else \
                2 if vm.can_create_device(DeviceType.ARM_VGIC_V2) else None
            has_filter = smccc_filter.supported(vm)
            nisv = bool(vm.check_extension(Cap.ARM_NISV_TO_USER))
            its = gic == 3 and vm.can_create_device(DeviceType.ARM_VGIC_ITS)
            cpu = tuple(name for name, (caps, _) in NEEDS.items() if all(vm.check_extension(c) for c in caps))
            sve_max_vl = probe_sve_max_vl(vm) if "sve" in cpu else 0
        finally:
            vm.close()
        return HostShape(
            kernel=os.uname().release, gic=gic, page_size=mmap.PAGESIZE,
            max_ipa_bits=kvm.check_extension(Cap.ARM_VM_IPA_SIZE), smccc_filter=has_filter,
            max_vcpus=kvm.check_extension(Cap.MAX_VCPUS) or kvm.check_extension(Cap.NR_VCPUS),
            nisv_to_user=nisv, guest_debug=bool(kvm.check_extension(Cap.SET_GUEST_DEBUG)),
            hw_breakpoints=kvm.check_extension(Cap.GUEST_DEBUG_HW_BPS),
            hw_watchpoints=kvm.check_extension(Cap.GUEST_DEBUG_HW_WPS), its=its, cpu=cpu, sve_max_vl=sve_max_vl,
            vhost_net=vhost_opens("/dev/vhost-net"), vhost_vsock=vhost_opens("/dev/vhost-vsock"))
    finally:
        kvm.close()


def vhost_opens(path: str) -> bool:
    from pyvmm.kvm.fds import VhostFd

    try:
        VhostFd(path).close()
    except (OSError, VmmError):
        return False
    return True


def probe_sve_max_vl(vm: VmFd) -> int:
    """SVE's longest vector on this host: a throwaway vCPU's KVM_REG_ARM64_SVE_VLS."""
    from kvm_bindings.regs import KVM_REG_ARM64_SVE_VLS, SVE_VLS_SIZE

    target, _ = vm.preferred_target()
    vcpu = vm.create_vcpu(0)
    try:
        vcpu.vcpu_init(target, [1 << VcpuFeature.SVE, 0, 0, 0, 0, 0, 0])
        return longest_vector(vcpu.get_one_reg_bytes(KVM_REG_ARM64_SVE_VLS, SVE_VLS_SIZE))
    finally:
        vcpu.close()


def runnable(shape: HostShape) -> bool:
    """Whether pyvmm can run a guest here at all (without the SMCCC filter it runs with KVM's
    in-kernel PSCI, as kvmtool does)."""
    return shape.gic is not None


def report(shape: HostShape) -> list[str]:
    """The shape, then what pyvmm can and cannot do on it, a line each."""
    from pyvmm.machine.gic import GICV2_MAX_VCPUS
    from pyvmm.machine.memory import RAM_BASE

    ipa = shape.max_ipa_bits or DEFAULT_IPA_BITS
    ram_room = ((1 << min(ipa, PYVMM_IPA_BITS)) - RAM_BASE) >> 20
    lines = [
        f"kernel          {shape.kernel}",
        f"GIC             {f'vGICv{shape.gic}' if shape.gic else 'none in the kernel'}",
        f"page size       {shape.page_size >> 10} KiB",
        f"IPA bits        {ipa}" + ("" if shape.max_ipa_bits else " (fixed: no KVM_CAP_ARM_VM_IPA_SIZE)"),
        f"SMCCC filter    {'supported' if shape.smccc_filter else 'missing'}",
        f"vCPUs           at most {shape.max_vcpus}",
        f"guest debug     {f'{shape.hw_breakpoints} hardware breakpoints, {shape.hw_watchpoints} watchpoints' if shape.guest_debug else 'missing'}",
        f"CPU features    {', '.join(cpu_names(shape)) or 'none of the optional ones'}",
        f"ITS             {'supported' if shape.its else 'missing'}",
        "",
    ]
    if shape.gic is None:
        lines.append("cannot: run guests: KVM offers no in-kernel vGIC here")
    if runnable(shape):
        vcpus = shape.max_vcpus if shape.gic == 3 else min(GICV2_MAX_VCPUS, shape.max_vcpus)
        lines.append(f"can: run guests with up to {vcpus} vCPUs on a vGICv{shape.gic}"
                     + (f" (a vGICv2 serves {GICV2_MAX_VCPUS} at most)" if shape.gic == 2 else ""))
        lines.append(f"can: give a guest up to {ram_room} MiB of RAM (from {RAM_BASE:#x}, within {min(ipa, PYVMM_IPA_BITS)}-bit addresses)")
        if shape.smccc_filter:
            lines.append("can: service PSCI, SDEI and custom SMCCC services in Python, and trace SMCCC calls")
        else:
            lines.append("can: give guests KVM's in-kernel PSCI (over HVC), as kvmtool does")
    if not shape.smccc_filter:
        lines.append(f"cannot: service PSCI, SDEI or custom SMCCC services in Python, trace SMCCC calls "
                     f"(--trace smccc), or use the SMC conduit: they need the SMCCC filter of Linux >= "
                     f"{MIN_KERNEL_TEXT} (this host runs {shape.kernel})")
        lines.append("cannot: --service, --replace-service, --deny, --sdei, --trace smccc, --psci-conduit smc, "
                     "or GDB's monitor catch smccc / smccc trace here")
    if not shape.nisv_to_user:
        lines.append("note: MMIO that KVM cannot decode (no valid syndrome) fails KVM_RUN instead of "
                     "reaching pyvmm (no KVM_CAP_ARM_NISV_TO_USER)")
    if not shape.guest_debug:
        lines.append("cannot: debug guests with GDB (no KVM_CAP_SET_GUEST_DEBUG)")
    if runnable(shape):
        on = [NEEDS[n][1] for n in NEEDS if n in shape.cpu and n != "pmu"]
        if on:
            lines.append(f"can: give guests the host's {', '.join(on)} (as kvmtool: --sve-max-vl, --disable-mte "
                         "and --no-pvtime limit them)")
        if "pmu" in shape.cpu:
            lines.append("can: give guests the host's PMU (--pmu)")
        missing = [f"{NEEDS[n][1]} ({flag})" for n, flag in (("pmu", "--pmu"), ("sve", "--sve-max-vl"))
                   if n not in shape.cpu]
        if not shape.its:
            missing.append("an ITS (--irqchip=gicv3-its)")
        if missing:
            lines.append(f"cannot: give guests {', '.join(missing)}: KVM offers none here")
    return lines


def cpu_names(shape: HostShape) -> list[str]:
    return [f"SVE (vectors up to {shape.sve_max_vl} bits)" if n == "sve" else NEEDS[n][1]
            for n in NEEDS if n in shape.cpu]

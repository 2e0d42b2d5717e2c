"""The CPU a guest sees: KVM's optional vCPU features, chosen as kvmtool chooses them, so that a
guest sees what the host's CPU has (kvmtool's arm/aarch64/kvm-cpu.c, kvm.c, pmu.c, pvtime.c):

- pointer authentication: the address and generic keys together (KVM takes both or neither,
  api.rst KVM_ARM_VCPU_INIT), on where KVM offers them;
- SVE: on where offered, with the vector lengths the host has up to `sve_max_vl` bits
  (KVM_REG_ARM64_SVE_VLS), fixed by KVM_ARM_VCPU_FINALIZE before the vCPU first runs;
- MTE: on where offered, enabled on the VM before any vCPU exists (KVM_CAP_ARM_MTE). Guest RAM
  must then be memory that can hold tags: pyvmm maps it private and anonymous (memory.py), which
  every kernel with the capability takes;
- the PMU (PMUv3): off unless asked for (kvmtool's --pmu); its overflow interrupt is PPI 7
  (INTID 23), set and initialised once the vGIC is (devices/vcpu.rst), and it has a DT node;
- PV stolen time: on where offered. Each vCPU gets a 64-byte structure in a 64 KiB region of
  guest memory that is not RAM (kvmtool's 0x1020000), which the guest finds with the SMCCC call
  PV_TIME_ST (Arm DEN0057A) that KVM answers itself.

AArch32 guests get none of them (SVE, pointer authentication and MTE are AArch64's; KVM refuses
MTE with AArch32 vCPUs). Set-up order: MTE on the VM; KVM_ARM_VCPU_INIT with the feature bits;
PV time's address; SVE's vector lengths, then KVM_ARM_VCPU_FINALIZE; after the vGIC's
CTRL_INIT, the PMU's interrupt and then its INIT.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from kvm_bindings.constants import Cap, VcpuFeature
from kvm_bindings.regs import SVE_VQ_MAX
from pyvmm.errors import KvmUnavailableError, VmmError

if TYPE_CHECKING:
    from devicetree.builder import Node, Phandles

PVTIME_BASE = 0x102_0000  # kvmtool's ARM_PVTIME_BASE, between the UART and virtio-mmio
PVTIME_SIZE = 0x1_0000  # room for 1024 vCPUs; one 64 KiB page on every host
PVTIME_STRUCT_SIZE = 64  # each vCPU's, 64-byte aligned (Documentation/virt/kvm/arm/pvtime.rst)
PMU_PPI = 7  # INTID 23, kvmtool's KVM_ARM_PMUv3_PPI, which kvm-unit-tests' pmu test expects
SVE_VL_MIN, SVE_VL_MAX = 128, 2048  # the architecture's vector lengths, in bits


class CpuOptions(NamedTuple):
    """What is asked for. None leaves a feature to the host (on where KVM offers it); True asks
    for it (a one-line error where KVM lacks it); False turns it off."""

    ptrauth: bool | None = None
    sve: bool | None = None
    sve_max_vl: int | None = None  # bits: SVE's longest vector (kvmtool's --sve-max-vl)
    mte: bool | None = None
    pmu: bool | None = False  # only when asked, as kvmtool's --pmu
    pvtime: bool | None = None


class CpuFeatures(NamedTuple):
    """What a VM's vCPUs have."""

    ptrauth: bool = False
    sve: bool = False
    sve_max_vl: int | None = None  # None: every length the host has
    mte: bool = False
    pmu: bool = False
    pvtime: bool = False

    def init_bits(self) -> int:
        """The kvm_vcpu_init.features[0] bits these features need."""
        bits = 0
        if self.ptrauth:
            bits |= 1 << VcpuFeature.PTRAUTH_ADDRESS | 1 << VcpuFeature.PTRAUTH_GENERIC
        if self.sve:
            bits |= 1 << VcpuFeature.SVE
        if self.pmu:
            bits |= 1 << VcpuFeature.PMU_V3
        return bits

    def names(self) -> list[str]:
        return [name for name, on in (("pointer authentication", self.ptrauth), ("SVE", self.sve), ("MTE", self.mte),
                                      ("PMU", self.pmu), ("PV stolen time", self.pvtime)) if on]


NO_FEATURES = CpuFeatures()
AS_THE_HOST_OFFERS = CpuOptions()  # kvmtool's defaults

# What each feature needs of KVM, and its name in a one-line refusal
NEEDS: dict[str, tuple[tuple[Cap, ...], str]] = {
    "ptrauth": ((Cap.ARM_PTRAUTH_ADDRESS, Cap.ARM_PTRAUTH_GENERIC), "pointer authentication"),
    "sve": ((Cap.ARM_SVE,), "SVE"),
    "mte": ((Cap.ARM_MTE,), "MTE"),
    "pmu": ((Cap.ARM_PMU_V3,), "PMU"),
    "pvtime": ((Cap.STEAL_TIME,), "PV stolen time"),
}


def check_sve_max_vl(bits: int) -> int:
    """kvmtool's rule for --sve-max-vl: a power of two, here from 128 to 2048 bits."""
    if bits & (bits - 1) or not SVE_VL_MIN <= bits <= SVE_VL_MAX:
        raise VmmError(f"an SVE vector length is a power of two from {SVE_VL_MIN} to {SVE_VL_MAX} bits, not {bits}")
    return bits


def choose(options: CpuOptions, offers: Callable[[Cap], int], *, aarch32: bool) -> CpuFeatures:
    """The features a VM gets from `options` on a KVM that `offers` (KVM_CHECK_EXTENSION)."""
    if options.sve_max_vl is not None:
        check_sve_max_vl(options.sve_max_vl)
        if options.sve is False:
            raise VmmError("--sve-max-vl limits SVE, which is turned off")
    chosen: dict[str, bool] = {}
    for name, (caps, what) in NEEDS.items():
        asked = getattr(options, name)
        if name == "sve" and options.sve_max_vl is not None:
            asked = True
        # An AArch32 EL1 has none of these but the PMU, whose CP15 registers PMUv3 defines for it
        # too (Arm ARM G8.4): KVM and kvmtool give it one with --pmu, as kvm-unit-tests' 32-bit
        # pmu tests ask
        if aarch32 and name != "pmu":
            if asked:
                raise VmmError(f"{what} is for AArch64 guests: this VM's vCPUs run AArch32")
            chosen[name] = False
            continue
        have = all(offers(cap) for cap in caps)
        if asked and not have:
            raise KvmUnavailableError(f"this host's KVM offers no {what} "
                                      f"({' and '.join(f'KVM_CAP_{cap.name}' for cap in caps)})")
        chosen[name] = have and asked is not False
    return CpuFeatures(sve_max_vl=options.sve_max_vl if chosen["sve"] else None, **chosen)


def limit_vector_lengths(vls: bytes, max_vl: int) -> bytes:
    """The KVM_REG_ARM64_SVE_VLS bitmap `vls` (bit VQ - 1 of 8 little-endian words: a length of
    VQ x 128 bits) with every length above `max_vl` bits cleared; max_vl must be one the host has."""
    bitmap = int.from_bytes(vls, "little")
    vq = max_vl // SVE_VL_MIN
    if not bitmap >> (vq - 1) & 1:
        have = [(n + 1) * SVE_VL_MIN for n in range(SVE_VQ_MAX) if bitmap >> n & 1]
        raise KvmUnavailableError(f"this host's SVE has no {max_vl}-bit vectors (it has: "
                                  f"{', '.join(map(str, have))} bits)")
    return (bitmap & ((1 << vq) - 1)).to_bytes(len(vls), "little")


def longest_vector(vls: bytes) -> int:
    """The longest vector length, in bits, in a KVM_REG_ARM64_SVE_VLS bitmap."""
    return int.from_bytes(vls, "little").bit_length() * SVE_VL_MIN


class PmuNode:
    """The PMU's DT node (Documentation/devicetree/bindings/arm/pmu.yaml), as kvmtool writes it."""

    def dt_node(self, ph: Phandles) -> Node:
        from devicetree.builder import Node
        from devicetree.machvirt import GIC_PPI, IRQ_TYPE_LEVEL_HIGH

        return Node("pmu", {"compatible": "arm,armv8-pmuv3", "interrupts": [GIC_PPI, PMU_PPI, IRQ_TYPE_LEVEL_HIGH]})

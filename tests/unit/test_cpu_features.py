"""The CPU a guest sees (pyvmm/machine/cpu_features.py), and the interrupt controller kvmtool's --irqchip
asks for (pyvmm/machine/gic.py), decided against a fake KVM: what each host offers, what is asked
for, the order of set-up, and the device-tree nodes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import pytest

from devicetree.builder import Phandles, build_dtb
from devicetree.machvirt import machine_tree
from kvm_bindings.constants import (
    KVM_DEV_ARM_VGIC_CTRL_INIT,
    KVM_DEV_ARM_VGIC_GRP_ADDR,
    KVM_DEV_ARM_VGIC_GRP_CTRL,
    KVM_VGIC_ITS_ADDR_TYPE,
    Cap,
    DeviceType,
    VcpuFeature,
)
from pyvmm.errors import KvmUnavailableError, VmmError
from pyvmm.kvm.fds import VmFd
from pyvmm.machine.cpu_features import (
    AS_THE_HOST_OFFERS,
    CpuFeatures,
    CpuOptions,
    PmuNode,
    choose,
    limit_vector_lengths,
    longest_vector,
)
from pyvmm.machine.gic import Gic
from tests.dts import decompile, string_lists
from tests.unit.fakes import FakeGicVmFd, gic_layout

EVERYTHING = {Cap.ARM_PTRAUTH_ADDRESS, Cap.ARM_PTRAUTH_GENERIC, Cap.ARM_SVE, Cap.ARM_MTE, Cap.ARM_PMU_V3,
              Cap.STEAL_TIME}


def offers(caps: set[Cap]) -> Callable[[Cap], int]:
    """KVM_CHECK_EXTENSION on a host with `caps`."""
    return lambda cap: int(cap in caps)


def test_by_default_the_guest_gets_what_the_host_offers_but_the_pmu() -> None:
    f = choose(AS_THE_HOST_OFFERS, offers(EVERYTHING), aarch32=False)
    assert f == CpuFeatures(ptrauth=True, sve=True, mte=True, pmu=False, pvtime=True)
    bits = f.init_bits()
    assert bits == 1 << VcpuFeature.PTRAUTH_ADDRESS | 1 << VcpuFeature.PTRAUTH_GENERIC | 1 << VcpuFeature.SVE
    # a host of only some: those, and nothing asked of the others
    f = choose(AS_THE_HOST_OFFERS, offers({Cap.ARM_SVE, Cap.ARM_PTRAUTH_ADDRESS}), aarch32=False)
    assert f == CpuFeatures(sve=True)  # pointer authentication needs both keys' capabilities


def test_what_is_turned_off_stays_off_and_what_is_asked_for_is_one_line_where_missing() -> None:
    f = choose(CpuOptions(mte=False, pvtime=False, pmu=True), offers(EVERYTHING), aarch32=False)
    assert (f.mte, f.pvtime, f.pmu) == (False, False, True) and f.init_bits() & 1 << VcpuFeature.PMU_V3
    with pytest.raises(KvmUnavailableError, match=r"^this host's KVM offers no PMU \(KVM_CAP_ARM_PMU_V3\)$"):
        choose(CpuOptions(pmu=True), offers(EVERYTHING - {Cap.ARM_PMU_V3}), aarch32=False)
    with pytest.raises(KvmUnavailableError, match=r"SVE \(KVM_CAP_ARM_SVE\)"):
        choose(CpuOptions(sve_max_vl=256), offers(EVERYTHING - {Cap.ARM_SVE}), aarch32=False)


@pytest.mark.parametrize("bits", [0, 64, 384, 4096, 129])
def test_sve_max_vl_follows_kvmtools_rule(bits: int) -> None:
    with pytest.raises(VmmError, match=f"power of two from 128 to 2048 bits, not {bits}"):
        choose(CpuOptions(sve_max_vl=bits), offers(EVERYTHING), aarch32=False)


def test_aarch32_guests_get_none_but_the_pmu_and_asking_is_one_line() -> None:
    assert choose(AS_THE_HOST_OFFERS, offers(EVERYTHING), aarch32=True) == CpuFeatures()
    assert choose(CpuOptions(pmu=True), offers(EVERYTHING), aarch32=True) == CpuFeatures(pmu=True)
    for asked in (CpuOptions(sve=True), CpuOptions(sve_max_vl=256), CpuOptions(ptrauth=True), CpuOptions(mte=True)):
        with pytest.raises(VmmError, match="is for AArch64 guests: this VM's vCPUs run AArch32"):
            choose(asked, offers(EVERYTHING), aarch32=True)


def test_vector_lengths_are_cut_above_the_maximum() -> None:
    # a host with 128, 256 and 512-bit vectors (VQ 1, 2, 4)
    vls = (0b1011).to_bytes(64, "little")
    assert longest_vector(vls) == 512
    assert int.from_bytes(limit_vector_lengths(vls, 256), "little") == 0b11
    assert limit_vector_lengths(vls, 512) == vls
    with pytest.raises(KvmUnavailableError, match=r"no 2048-bit vectors \(it has: 128, 256, 512 bits\)"):
        limit_vector_lengths(vls, 2048)


def test_the_pmu_node_is_kvmtools() -> None:
    dts = decompile(build_dtb(machine_tree(cpus=[0], memory=[(0x8000_0000, 1 << 20)], gic=gic_layout(1),
                                           devices=[PmuNode()])))
    assert ["arm,armv8-pmuv3"] in string_lists(dts, "compatible")
    assert "interrupts = <0x01 0x07 0x04>;" in dts  # PPI 7: INTID 23, level high
    assert PmuNode().dt_node(Phandles()).name == "pmu"


def test_irqchip_gicv3_its_places_and_initialises_an_its_below_the_redistributors() -> None:
    vm = FakeGicVmFd(3)
    gic = Gic(cast(VmFd, vm), 2, "gicv3-its")
    its = next(d for d in vm.devices if d.kind == DeviceType.ARM_VGIC_ITS)
    assert gic.its_base == gic.redist_base - 0x2_0000
    assert its.attrs == [(KVM_DEV_ARM_VGIC_GRP_ADDR, KVM_VGIC_ITS_ADDR_TYPE, gic.its_base),
                         (KVM_DEV_ARM_VGIC_GRP_CTRL, KVM_DEV_ARM_VGIC_CTRL_INIT, 0)]
    assert (gic.its_base, 0x2_0000, "gic-its") in gic.mmio_regions and len(gic.regions) == 2
    dts = decompile(build_dtb(machine_tree(cpus=[0, 1], memory=[(0x8000_0000, 1 << 20)], gic=gic)))
    assert ["arm,gic-v3-its"] in string_lists(dts, "compatible")
    assert f"msi-controller@{gic.its_base:x} {{" in dts and "msi-controller;" in dts and "#msi-cells = <0x01>;" in dts
    gic.close()
    assert all(d.closed for d in vm.devices)


@pytest.mark.parametrize(("host_version", "its", "irqchip", "message"), [
    (3, False, "gicv3-its", "offers no ITS"),
    (2, False, "gicv3", "--irqchip=gicv3: this host's KVM offers no vGICv3"),
    (3, True, "gicv2", "--irqchip=gicv2: this host's KVM offers no vGICv2"),
])
def test_an_irqchip_the_host_lacks_is_one_line(host_version: int, its: bool, irqchip: str, message: str) -> None:
    vm = FakeGicVmFd(host_version, its=its, v2_compatible=False)
    with pytest.raises(KvmUnavailableError, match=message):
        Gic(cast(VmFd, vm), 2, irqchip)
    assert all(d.closed for d in vm.devices)  # nothing is left open


@pytest.mark.parametrize(("host_version", "its", "version", "has_its"), [
    (3, True, 3, True), (3, False, 3, False), (2, False, 2, False)])
def test_auto_is_kvmtools_choice(host_version: int, its: bool, version: int, has_its: bool) -> None:
    """kvmtool's IRQCHIP_AUTO (arm/gic.c): a vGICv3 with an ITS, else a vGICv3, else a vGICv2."""
    vm = FakeGicVmFd(host_version, its=its)
    gic = Gic(cast(VmFd, vm), 2)
    assert (gic.version, gic.its_region is not None) == (version, has_its)
    gic.close()


def test_irqchip_gicv2_on_a_gicv3_host_with_v2_compatibility() -> None:
    gic = gic_layout(2, 3, "gicv2")
    assert gic.version == 2 and gic.its_base is None


class RecordingVcpuFd:
    """A vCPU fd that records the set-up calls Vcpu makes, in order (api.rst: KVM_ARM_VCPU_INIT,
    then the vCPU's device attributes and SVE's vector lengths, then KVM_ARM_VCPU_FINALIZE)."""

    mmap = None

    def __init__(self, vls: int) -> None:
        self.calls: list[str] = []
        self.vls = vls.to_bytes(64, "little")

    def vcpu_init(self, target: int, features: list[int]) -> None:
        self.calls.append(f"init {features[0]:#x}")

    def set_device_attr_u64(self, group: int, attr: int, value: int, what: str) -> None:
        self.calls.append(f"attr {group}.{attr} = {value:#x}")

    def set_device_attr_u32(self, group: int, attr: int, value: int, what: str) -> None:
        self.calls.append(f"attr {group}.{attr} = {value}")

    def set_device_attr(self, group: int, attr: int, value: int, what: str) -> None:
        self.calls.append(f"attr {group}.{attr}")

    def get_one_reg_bytes(self, reg_id: int, size: int) -> bytes:
        self.calls.append("get VLS")
        return self.vls

    def set_one_reg_bytes(self, reg_id: int, data: bytes) -> None:
        self.calls.append(f"set VLS {int.from_bytes(data, 'little'):#b}")

    def finalize(self, feature: int) -> None:
        self.calls.append(f"finalize {feature}")

    def get_one_reg(self, reg_id: int) -> int:
        return 0

    def set_one_reg(self, reg_id: int, value: int) -> None:
        pass

    def get_x(self, n: int) -> int:
        return 0

    def set_x0(self, value: int) -> None:
        pass


def test_a_vcpus_features_are_set_up_in_kvms_order() -> None:
    """INIT with the feature bits, PV time's IPA, the vector lengths cut to --sve-max-vl, FINALIZE
    last (KVM refuses VLS after it and runs no vCPU before it); the PMU's interrupt before its
    INIT, once the vGIC exists (devices/vcpu.rst)."""
    from kvm_bindings.constants import (
        KVM_ARM_VCPU_PMU_V3_CTRL,
        KVM_ARM_VCPU_PMU_V3_INIT,
        KVM_ARM_VCPU_PMU_V3_IRQ,
        KVM_ARM_VCPU_PVTIME_CTRL,
        KVM_ARM_VCPU_PVTIME_IPA,
    )
    from pyvmm.machine.cpu_features import PVTIME_BASE
    from pyvmm.machine.vcpu import Vcpu

    fd = RecordingVcpuFd(vls=0b1011)  # 128, 256 and 512-bit vectors
    features = CpuFeatures(ptrauth=True, sve=True, sve_max_vl=256, pmu=True, pvtime=True)
    vcpu = Vcpu(1, cast(Any, fd), 0, cast(Any, None), features=features)
    bits = (1 << VcpuFeature.PSCI_0_2 | 1 << VcpuFeature.POWER_OFF | 1 << VcpuFeature.PTRAUTH_ADDRESS
            | 1 << VcpuFeature.PTRAUTH_GENERIC | 1 << VcpuFeature.SVE | 1 << VcpuFeature.PMU_V3)
    assert fd.calls == [f"init {bits:#x}",
                        f"attr {KVM_ARM_VCPU_PVTIME_CTRL}.{KVM_ARM_VCPU_PVTIME_IPA} = {PVTIME_BASE + 64:#x}",
                        "get VLS", "set VLS 0b11", f"finalize {VcpuFeature.SVE}"]
    assert vcpu.sve_vl == 256
    fd.calls.clear()
    vcpu.init_pmu()
    assert fd.calls == [f"attr {KVM_ARM_VCPU_PMU_V3_CTRL}.{KVM_ARM_VCPU_PMU_V3_IRQ} = 23",
                        f"attr {KVM_ARM_VCPU_PMU_V3_CTRL}.{KVM_ARM_VCPU_PMU_V3_INIT}"]

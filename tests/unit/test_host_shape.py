"""The host-shape logic with the values each shape gives (pyvmm/machine/host.py): IPA sizing and what
`pyvmm check` says on GICv3 / 4K / 6.12, GICv2, 16K pages and Linux 6.1."""

from __future__ import annotations

import pytest

from pyvmm.errors import VmmError
from pyvmm.machine.host import HostShape, probe_ipa_bits, report, runnable, vm_ipa_bits

GIB = 1 << 30
DEFAULT = HostShape(kernel="6.12.95+deb12-arm64", gic=3, page_size=4096, max_ipa_bits=44, smccc_filter=True,
                    max_vcpus=512, nisv_to_user=True, guest_debug=True, hw_breakpoints=6, hw_watchpoints=4)
GICV2 = DEFAULT._replace(gic=2, max_ipa_bits=40, max_vcpus=8)  # a Raspberry Pi 4's GIC-400: VGIC_V2_MAX_CPUS
PAGES_16K = DEFAULT._replace(kernel="6.12.95+deb12-arm64-16k", page_size=16384, max_ipa_bits=42)
LINUX_61 = DEFAULT._replace(kernel="6.1.0-28-arm64", smccc_filter=False)


@pytest.mark.parametrize(("ram_end", "host", "bits"), [
    (2 * GIB + (64 << 20), 44, 0),  # fits the default 40 bits: KVM's default type
    (2 * GIB + (64 << 20), 40, 0),
    (2 * GIB + (64 << 20), 36, 32),  # a board with 36-bit IPAs: the smallest size that holds it
    (2 * GIB + (64 << 20), 0, 0),  # no KVM_CAP_ARM_VM_IPA_SIZE: 40 bits
    (2 * GIB + 1024 * GIB, 44, 41),  # 1 TiB of RAM from 2 GiB needs 41 bits
])
def test_ipa_bits_hold_the_ram(ram_end: int, host: int, bits: int) -> None:
    assert vm_ipa_bits(ram_end, host) == bits


def test_ram_beyond_the_hosts_ipa_size_is_refused_in_words() -> None:
    with pytest.raises(VmmError, match="needs 37-bit guest physical addresses; this host's KVM gives at most 36"):
        vm_ipa_bits(2 * GIB + 64 * GIB, 36)
    with pytest.raises(VmmError, match="gives 40 bits and cannot give more"):
        vm_ipa_bits(2 * GIB + 1024 * GIB, 0)


def test_each_shape_in_words() -> None:
    default = "\n".join(report(DEFAULT))
    assert "GIC             vGICv3" in default and "page size       4 KiB" in default
    assert "can: run guests with up to 512 vCPUs on a vGICv3" in default
    assert "can: give a guest up to 16775168 MiB of RAM" in default  # 2**44 - 2 GiB
    assert "up to 268433408 MiB of RAM (from 0x80000000, within 48-bit" in "\n".join(
        report(DEFAULT._replace(max_ipa_bits=52)))  # pyvmm's own limit
    v2 = "\n".join(report(GICV2))
    assert "can: run guests with up to 8 vCPUs on a vGICv2 (a vGICv2 serves 8 at most)" in v2
    assert "up to 1046528 MiB" in v2  # 2**40 - 2 GiB
    assert "page size       16 KiB" in "\n".join(report(PAGES_16K))
    old = "\n".join(report(LINUX_61))
    assert "SMCCC filter    missing" in old
    assert not any(line.startswith("cannot: run guests") for line in old)
    assert "can: give guests KVM's in-kernel PSCI (over HVC), as kvmtool does" in old
    assert ("cannot: service PSCI, SDEI or custom SMCCC services in Python, trace SMCCC calls (--trace smccc), "
            "or use the SMC conduit: they need the SMCCC filter of Linux >= 6.4 (this host runs 6.1.0-28-arm64)") in old
    assert "can: service PSCI" not in old
    assert [runnable(s) for s in (DEFAULT, GICV2, PAGES_16K, LINUX_61)] == [True, True, True, True]
    assert not runnable(DEFAULT._replace(gic=None))
    nothing = "\n".join(report(DEFAULT._replace(gic=None, guest_debug=False, nisv_to_user=False)))
    assert "cannot: run guests: KVM offers no in-kernel vGIC here" in nothing
    assert "cannot: debug guests with GDB" in nothing and "no KVM_CAP_ARM_NISV_TO_USER" in nothing


@pytest.mark.parametrize(("host", "machine_type"), [(0, 0), (40, 0), (48, 0), (36, 36), (32, 32)])
def test_the_probes_vm_asks_for_an_ipa_size_the_host_has(host: int, machine_type: int) -> None:
    """KVM refuses machine type 0 (40 bits) on a host of fewer (kvm_init_stage2_mmu)."""
    assert probe_ipa_bits(host) == machine_type


def test_the_cpu_features_and_the_its_in_words() -> None:
    emulated = DEFAULT._replace(cpu=("ptrauth", "sve", "pmu", "pvtime"), sve_max_vl=2048, its=True)
    lines = report(emulated)
    assert "CPU features    pointer authentication, SVE (vectors up to 2048 bits), PMU, PV stolen time" in lines
    assert "ITS             supported" in lines and not any(line.startswith("cannot: give") for line in lines)
    assert "can: give guests the host's PMU (--pmu)" in lines
    bare = report(DEFAULT._replace(cpu=(), its=False))
    assert "CPU features    none of the optional ones" in bare
    assert ("cannot: give guests PMU (--pmu), SVE (--sve-max-vl), an ITS (--irqchip=gicv3-its): KVM offers none "
            "here") in bare

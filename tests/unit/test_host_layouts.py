"""What depends on the host's shape, with the values each shape gives: the vGIC's layout per
version (pyvmm/machine/gic.py, the device tree's node of it) and guest memory's alignment to the
host's page (pyvmm/machine/memory.py: 4K, 16K as on Asahi Linux, 64K)."""

from __future__ import annotations

from typing import cast

import pytest

from devicetree.builder import U64, Phandles
from devicetree.machvirt import gic_node
from kvm_bindings.constants import (
    KVM_DEV_ARM_VGIC_GRP_ADDR,
    KVM_VGIC_V2_ADDR_TYPE_CPU,
    KVM_VGIC_V2_ADDR_TYPE_DIST,
    KVM_VGIC_V3_ADDR_TYPE_DIST,
    KVM_VGIC_V3_ADDR_TYPE_REDIST,
    DeviceType,
)
from pyvmm.errors import GuestMemoryError, KvmUnavailableError
from pyvmm.kvm.fds import VmFd
from pyvmm.machine import memory
from pyvmm.machine.gic import Gic
from tests.unit.fakes import FakeGicVmFd

DIST = 0x3FFF_0000


def make_gic(version: int, cpus: int) -> tuple[Gic, FakeGicVmFd]:
    fd = FakeGicVmFd(version)
    return Gic(cast(VmFd, fd), cpus), fd


@pytest.mark.parametrize("cpus", [1, 2, 512])
def test_a_vgicv3_has_a_redistributor_per_vcpu_right_below_the_distributor(cpus: int) -> None:
    gic, fd = make_gic(3, cpus)
    redist = DIST - cpus * 0x2_0000  # 128 KiB each: RD_base and SGI_base frames
    assert gic.version == 3 and gic.regions == [(DIST, 0x1_0000, "gic-dist"), (redist, cpus * 0x2_0000, "gic-redist")]
    dev, its = fd.devices  # and an ITS, as kvmtool's --irqchip auto gives
    assert (dev.kind, its.kind) == (DeviceType.ARM_VGIC_V3, DeviceType.ARM_VGIC_ITS)
    assert dev.attrs == [(KVM_DEV_ARM_VGIC_GRP_ADDR, KVM_VGIC_V3_ADDR_TYPE_DIST, DIST),
                         (KVM_DEV_ARM_VGIC_GRP_ADDR, KVM_VGIC_V3_ADDR_TYPE_REDIST, redist)]


@pytest.mark.parametrize("cpus", [1, 8])
def test_a_gicv2_host_gives_a_vgicv2_with_its_cpu_interface_below_the_distributor(cpus: int) -> None:
    gic, fd = make_gic(2, cpus)
    assert gic.version == 2 and gic.regions == [(DIST, 0x1_0000, "gic-dist"), (0x3FFD_0000, 0x2_0000, "gic-cpu")]
    dev, = fd.devices  # the refused vGICv3 left nothing behind
    assert dev.kind == DeviceType.ARM_VGIC_V2
    assert dev.attrs == [(KVM_DEV_ARM_VGIC_GRP_ADDR, KVM_VGIC_V2_ADDR_TYPE_DIST, DIST),
                         (KVM_DEV_ARM_VGIC_GRP_ADDR, KVM_VGIC_V2_ADDR_TYPE_CPU, 0x3FFD_0000)]


def test_a_vgicv2_serves_eight_vcpus_and_a_ninth_is_one_line() -> None:
    with pytest.raises(KvmUnavailableError, match="^this host's KVM offers only a GICv2, which serves at most 8 "
                                                  "vCPUs, not 9$"):
        make_gic(2, 9)
    make_gic(3, 9)  # a vGICv3 takes them


@pytest.mark.parametrize(("version", "compatible", "reg"), [
    (3, "arm,gic-v3", [DIST, 0x1_0000, DIST - 0x4_0000, 0x4_0000]),
    (2, "arm,cortex-a15-gic", [DIST, 0x1_0000, 0x3FFD_0000, 0x2_0000]),
])
def test_the_device_tree_node_follows_the_version(version: int, compatible: str, reg: list[int]) -> None:
    """Documentation/devicetree/bindings/interrupt-controller/arm,gic-v3.yaml and arm,gic.yaml."""
    gic, _ = make_gic(version, 2)
    node = gic_node(gic, Phandles())
    assert node.name == "intc@3fff0000" and node.props["compatible"] == compatible
    cells = node.props["reg"]
    assert isinstance(cells, list) and [v.value for v in cells if isinstance(v, U64)] == reg


@pytest.mark.parametrize("page", [4096, 16384, 65536])
def test_guest_memory_is_aligned_to_the_hosts_page(page: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "PAGE_SIZE", page)
    m = memory.GuestMemory()
    try:
        m.add(0x8000_0000, 16 * page)
        for gpa, size in ((0x9000_0000 + page // 2, page), (0x9000_0000, page + page // 2)):
            with pytest.raises(GuestMemoryError, match=f"must be a non-empty multiple of the {page}-byte page"):
                m.add(gpa, size)
        m.add(0x9000_0000, page)  # one page, on a page boundary: fine
        if page > 4096:
            with pytest.raises(GuestMemoryError, match="multiple"):
                m.add(0xA000_0000, 4096)  # a 4K region, fine on a 4K host, is not on this one
    finally:
        m.close()


@pytest.mark.parametrize(("page", "block"), [(4096, 2 << 20), (16384, 32 << 20), (65536, 512 << 20)])
def test_the_stage2_block_size_follows_the_page_size(page: int, block: int) -> None:
    """A level-2 block maps a whole table of page/8 entries of `page` bytes (Arm ARM D8.3)."""
    assert memory.block_size(page) == block

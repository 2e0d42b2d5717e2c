"""kvm.py's wrappers for in-kernel objects against real KVM."""

from __future__ import annotations

import os

from kvm_bindings.regs import CORE_REGS, SYS_REGS
from pyvmm.machine.host import probe
from tests.kvm.conftest import MakeVm


def test_reg_list_names_core_and_system_registers(make_vm: MakeVm) -> None:
    regs = set(make_vm("spin").vcpus[0].fd.get_reg_list())
    assert CORE_REGS["pc"] in regs and CORE_REGS["x30"] in regs
    assert SYS_REGS["mpidr_el1"] in regs


def test_the_vgic_is_at_kvmtools_addresses(make_vm: MakeVm) -> None:
    """A vGICv3 where the host has one, else a vGICv2 (a GIC-400 board), kvmtool's layout either way."""
    vm = make_vm("spin", cpus=2)
    assert vm.gic.version == probe().gic
    if vm.gic.version == 3:  # redistributors, 128 KiB per vCPU, right below the distributor
        assert vm.gic.regions == [(0x3FFF_0000, 0x1_0000, "gic-dist"), (0x3FFB_0000, 0x4_0000, "gic-redist")]
    else:  # the GICv2 CPU interface, 128 KiB, right below the distributor
        assert vm.gic.regions == [(0x3FFF_0000, 0x1_0000, "gic-dist"), (0x3FFD_0000, 0x2_0000, "gic-cpu")]


def test_ioeventfd_completes_a_store_without_an_exit(make_vm: MakeVm) -> None:
    vm = make_vm("mmio_unmapped")
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        vm.fd.ioeventfd(0x1000_0000, 4, efd)
        assert vm.run(timeout=30).reason == "poweroff"
        assert os.eventfd_read(efd) == 1  # the guest's 4-byte store signalled the eventfd
        # ... and never reached userspace: only the 8-byte load did
        assert [(a.size, a.is_write) for a in vm.unhandled_mmio.accesses] == [(8, False)]
    finally:
        os.close(efd)

"""kvm.py's wrappers for in-kernel objects against real KVM."""

from __future__ import annotations

import os

from kvm_bindings.regs import CORE_REGS, SYS_REGS
from pyvmm.machine.host import probe
from pyvmm.testing.payloads import MakePayloadVm
from tests.kvm.conftest import guest


def test_reg_list_names_core_and_system_registers(payload_vm: MakePayloadVm) -> None:
    regs = set(payload_vm(guest("spin")).vm.vcpus[0].fd.get_reg_list())
    assert CORE_REGS["pc"] in regs and CORE_REGS["x30"] in regs
    assert SYS_REGS["mpidr_el1"] in regs


def test_the_vgic_is_at_kvmtools_addresses(payload_vm: MakePayloadVm) -> None:
    """A vGICv3 where the host has one, else a vGICv2 (a GIC-400 board), kvmtool's layout either way."""
    vm = payload_vm(guest("spin"), cpus=2).vm
    assert vm.gic.version == probe().gic
    if vm.gic.version == 3:  # redistributors, 128 KiB per vCPU, right below the distributor
        assert vm.gic.regions == [(0x3FFF_0000, 0x1_0000, "gic-dist"), (0x3FFB_0000, 0x4_0000, "gic-redist")]
    else:  # the GICv2 CPU interface, 128 KiB, right below the distributor
        assert vm.gic.regions == [(0x3FFF_0000, 0x1_0000, "gic-dist"), (0x3FFD_0000, 0x2_0000, "gic-cpu")]


def test_ioeventfd_completes_a_store_without_an_exit(payload_vm: MakePayloadVm) -> None:
    vm = payload_vm(guest("mmio_unmapped")).vm
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        vm.fd.ioeventfd(0x1000_0000, 4, efd)
        assert vm.run(timeout=30).reason == "poweroff"
        assert os.eventfd_read(efd) == 1  # the guest's 4-byte store signalled the eventfd
        # ... and never reached userspace: only the 8-byte load did
        assert [(a.size, a.is_write) for a in vm.unhandled_mmio.accesses] == [(8, False)]
    finally:
        os.close(efd)

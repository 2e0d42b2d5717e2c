"""Stopping guests, unmapped accesses, registers and memory on real KVM."""

from __future__ import annotations

import threading
import time

import pytest

from pyvmm.errors import GuestMemoryError
from pyvmm.machine.vcpu import Vcpu
from pyvmm.testing.payloads import MakePayloadVm
from tests.kvm.conftest import NEEDS_FILTER, guest


def test_spinning_guest_is_stopped_within_bounded_time(payload_vm: MakePayloadVm) -> None:
    vm = payload_vm(guest("spin"), cpus=2).vm
    started = time.monotonic()
    result = vm.run(timeout=1.0)
    assert result.reason == "timeout"
    assert time.monotonic() - started < 6.0
    assert all(v.thread is not None and not v.thread.is_alive() for v in vm.vcpus)


def test_stop_from_another_thread(payload_vm: MakePayloadVm) -> None:
    vm = payload_vm(guest("spin")).vm
    threading.Timer(0.5, vm.stop, args=("test asked",)).start()
    result = vm.run(timeout=60)
    assert (result.reason, result.message) == ("stopped", "test asked")
    assert result.elapsed < 30


@NEEDS_FILTER
def test_unmapped_access_is_a_clean_mmio_exit(payload_vm: MakePayloadVm) -> None:
    run = payload_vm(guest("mmio_unmapped"))
    vm = run.vm
    result = run.run(30).result
    assert result.reason == "poweroff", result
    assert run.values[0][:2] == (0, 1)  # the load read zero, and the guest went on
    accesses = [(a.addr, a.size, a.is_write, a.data) for a in vm.unhandled_mmio.accesses]
    assert accesses == [(0x1000_0000, 4, True, 0xDEADBEEF), (0x1000_0000, 8, False, 0)]


def test_unmapped_access_with_stop_policy_is_a_clear_error(payload_vm: MakePayloadVm) -> None:
    vm = payload_vm(guest("mmio_unmapped"), unhandled_mmio="stop").vm
    result = vm.run(timeout=30)
    assert result.reason == "error"
    assert result.message == "guest write of 4 bytes at 0x10000000: no RAM or device there"


def test_undecodable_unmapped_access_is_a_clear_error(payload_vm: MakePayloadVm) -> None:
    vm = payload_vm(guest("mmio_nisv")).vm
    result = vm.run(timeout=30)
    assert result.reason == "error"
    assert "0x10000000" in result.message and "cannot decode" in result.message


def test_registers_by_name_and_encoding(payload_vm: MakePayloadVm) -> None:
    vm = payload_vm(guest("spin"), cpus=2).vm
    v0, v1 = vm.vcpus
    assert v0.get_reg("pc") == vm.ram_base
    assert v0.get_reg("pstate") == 0x3C5
    for name, value in [("x5", 0x1234_5678_9ABC_DEF0), ("x30", 7), ("sp", 0x8000_1000),
                        ("sp_el1", 0x8000_2000), ("elr_el1", 0x8000_3000), ("spsr_el1", 0x3C5),
                        ("vbar_el1", 0x8000_0800)]:
        v0.set_reg(name, value)
        assert v0.get_reg(name) == value, name
    # MPIDR_EL1 by name and by encoding (op0=3, op1=0, CRn=0, CRm=0, op2=5): Aff0 = vCPU index
    assert v1.get_sysreg(3, 0, 0, 0, 5) & 0xFF == 1
    assert v0.mpidr & 0xFF == 0
    with pytest.raises(KeyError, match="unknown register 'x31'"):
        v0.get_reg("x31")


def test_overlapping_and_out_of_range_memory_is_refused(payload_vm: MakePayloadVm) -> None:
    vm = payload_vm(guest("spin")).vm
    with pytest.raises(GuestMemoryError, match="overlaps 0x80000000-0x80ffffff"):
        vm.add_memory(0x80F0_0000, 0x20_0000)
    with pytest.raises(GuestMemoryError, match="not inside guest RAM"):
        vm.memory.read(0x80FF_FFF0, 0x20)
    vm.add_memory(0x4000_0000, 0x1_0000)  # a second, separate slot works
    vm.memory.write(0x4000_0000, b"abc")
    assert vm.memory.read(0x4000_0000, 3) == b"abc"


class RecordingDevice:
    """A register window that records stores and answers loads with a fixed pattern."""

    def __init__(self) -> None:
        self.log: list[tuple[str, int, int, int]] = []

    def read(self, offset: int, size: int) -> int:
        self.log.append(("read", offset, size, 0))
        return 0x1234_5678_9ABC_DEF0

    def write(self, offset: int, size: int, value: int) -> None:
        self.log.append(("write", offset, size, value))


@NEEDS_FILTER
def test_mmio_exits_reach_the_device_on_the_bus(payload_vm: MakePayloadVm) -> None:
    run = payload_vm(guest("mmio_unmapped"))
    vm = run.vm
    dev = RecordingDevice()
    vm.add_device(0x1000_0000, 0x1000, dev, "recorder")
    assert run.run(30).reason == "poweroff"
    assert dev.log == [("write", 0, 4, 0xDEADBEEF), ("read", 0, 8, 0)]
    assert run.values[0][0] == 0x1234_5678_9ABC_DEF0  # the guest's load got the device's value
    assert vm.unhandled_mmio.accesses == []


def test_device_overlapping_ram_is_refused(payload_vm: MakePayloadVm) -> None:
    vm = payload_vm(guest("spin")).vm
    with pytest.raises(Exception, match="overlaps guest RAM"):
        vm.add_device(vm.ram_base + 0x1000, 0x1000, RecordingDevice(), "bad")


def test_request_runs_on_the_vcpu_thread_while_the_guest_spins(payload_vm: MakePayloadVm) -> None:
    vm = payload_vm(guest("spin")).vm
    seen: list[tuple[str, int]] = []

    def look(vcpu: Vcpu) -> None:
        seen.append((threading.current_thread().name, vcpu.get_reg("pc")))
        vm.stop("looked")

    threading.Timer(0.5, vm.vcpus[0].request, args=(look,)).start()
    result = vm.run(timeout=60)
    assert (result.reason, result.message) == ("stopped", "looked")
    (thread, pc), = seen
    assert thread == "vcpu0" and vm.ram_base <= pc < vm.ram_base + 8  # inside the spin loop

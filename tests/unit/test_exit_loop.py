"""A vCPU's exit loop answering forwarded SMCCC calls, on a fake vCPU fd: the dispatcher gives
the loop a single result for x0, which the loop writes with its prepared KVM_SET_ONE_REG; what
else a call returns the dispatcher writes itself."""

from __future__ import annotations

from typing import Any, cast

import pytest

from kvm_bindings import ffi
from kvm_bindings.regs import CORE_REGS
from pyvmm.devices.bus import MmioBus
from pyvmm.errors import KvmIoctlError, VmmError
from pyvmm.kvm.fds import VcpuFd
from pyvmm.machine.exit_dispatch import MachineExits, UnhandledMmio
from pyvmm.machine.vcpu import Vcpu
from pyvmm.smccc.call import SmcccCall
from pyvmm.smccc.dispatcher import Dispatcher, HandlerError
from pyvmm.smccc.service import NO_RESULT, Results
from tests.unit.fakes import FakeVcpu, FakeVcpuFd

SIP64, SIP32 = 0xC200_0000, 0x8200_0000
U64 = 0xFFFF_FFFF_FFFF_FFFF
UNWRITTEN = 0xDEAD


def vcpu_on(d: Dispatcher) -> tuple[FakeVcpuFd, Vcpu]:
    fd = FakeVcpuFd()
    none = cast(Any, None)  # no MMIO, no system event: the MMIO policy and life cycle are not asked
    return fd, Vcpu(0, cast(VcpuFd, fd), 0, MachineExits(d, MmioBus(), none, none))


def run_call(fd: FakeVcpuFd, vcpu: Vcpu, function_id: int, x: dict[int, int] | None = None, flags: int = 0) -> int:
    """One forwarded call through the loop; x0 as the loop left it (UNWRITTEN: not written)."""
    for n, value in (x or {}).items():
        fd.regs[CORE_REGS[f"x{n}"]] = value
    fd.hypercall(function_id, flags)
    fd.x0_value[0] = UNWRITTEN
    fd.arm(1)
    vcpu.leave_guest()  # the kick after the call ends the loop
    vcpu._loop()
    return int(fd.x0_value[0])


def test_the_loop_writes_a_single_result_in_the_calls_width() -> None:
    d = Dispatcher()
    d.register(SIP64, 1, lambda call: -2)
    d.register(SIP32, 1, lambda call: -2)
    d.register(SIP32 + 1, 1, lambda call: call.arg(1) + 1)
    fd, vcpu = vcpu_on(d)
    assert run_call(fd, vcpu, SIP64) == U64 - 1
    assert run_call(fd, vcpu, SIP32) == 0xFFFF_FFFE
    assert run_call(fd, vcpu, SIP32 + 1, {1: 0x1_0000_0004}) == 5  # w1 + 1
    assert run_call(fd, vcpu, 0xC300_0000) == U64  # no route: NOT_SUPPORTED
    assert run_call(fd, vcpu, SIP64, flags=1) == U64  # SMC to an HVC VM: NOT_SUPPORTED
    assert d.calls == 5


def test_a_call_that_does_not_return_leaves_x0_and_several_results_are_written_by_the_dispatcher() -> None:
    d = Dispatcher()
    d.register(SIP64, 1, lambda call: NO_RESULT)

    def four(call: SmcccCall) -> Results:
        x1, x2, x3 = call.args(3)
        return (0, x1, x2 + 1, x3)

    d.register(SIP64 + 1, 1, four)
    fd, vcpu = vcpu_on(d)
    assert run_call(fd, vcpu, SIP64) == UNWRITTEN
    assert run_call(fd, vcpu, SIP64 + 1, {1: 10, 2: 20, 3: 30}) == UNWRITTEN
    assert [fd.regs[CORE_REGS[f"x{n}"]] for n in range(4)] == [0, 10, 21, 30]  # x0 too, by set_one_reg


def test_a_failed_result_write_and_a_failing_handler_end_the_loop() -> None:
    d = Dispatcher()
    d.register(SIP64, 1, lambda call: 0)
    d.register(SIP64 + 1, 1, lambda call: 1 // 0)
    fd, vcpu = vcpu_on(d)
    fd.write_x0 = lambda: -1
    with pytest.raises(KvmIoctlError, match="KVM_SET_ONE_REG"):
        run_call(fd, vcpu, SIP64)
    with pytest.raises(HandlerError, match="ZeroDivisionError"):
        run_call(fd, vcpu, SIP64 + 1)


def test_answer_leaves_x0_to_the_caller() -> None:
    """Dispatcher.answer (the loop's hot path) writes no register for a single result; dispatch
    writes the same value through set_x0."""
    d, v = Dispatcher(), FakeVcpu()
    d.register(SIP32, 1, lambda call: 7)
    d.register(SIP32 + 1, 1, lambda call: (1, 2))
    assert d.answer(v, SIP32, 0) == 7 and v.writes == []
    assert d.answer(v, SIP32 + 2, 0) == 0xFFFF_FFFF and v.writes == []  # no route: NOT_SUPPORTED
    assert d.answer(v, SIP32 + 1, 0) is None and v.writes == [(0, 1), (1, 2)]
    d.dispatch(v, SIP32, 0)
    assert v.writes[-1] == (0, 7)


class Registers:
    """An MMIO device that records what reaches its read() and write()."""

    def __init__(self) -> None:
        self.reads: list[tuple[int, int]] = []
        self.writes: list[tuple[int, int, int]] = []

    def read(self, offset: int, size: int) -> int:
        self.reads.append((offset, size))
        return 0x77

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes.append((offset, size, value))


def run_mmio(fd: FakeVcpuFd, vcpu: Vcpu, addr: int, size: int, is_write: bool = False, data: int = 0) -> int:
    """One MMIO exit through the loop; what kvm_run.mmio.data holds afterwards."""
    fd.mmio(addr, size, is_write, data)
    fd.arm(1)
    vcpu.leave_guest()
    vcpu._loop()
    return int.from_bytes(ffi.buffer(fd.run_struct.mmio.data), "little")


def test_a_32_bit_load_of_a_hot_register_is_answered_by_the_loop_without_the_device() -> None:
    """virtio-mmio's InterruptStatus is read on every interrupt: the loop answers it from the
    bus's hot registers, and any other access at that address goes to the device as before."""
    bus, device = MmioBus(), Registers()
    bus.add(0x0A00_0000, 0x200, device, "regs")
    isr = [1]
    bus.add_hot_register(0x0A00_0060, lambda: isr[0])
    fd = FakeVcpuFd()
    vcpu = Vcpu(0, cast(VcpuFd, fd), 0, MachineExits(Dispatcher(), bus, UnhandledMmio("stop"), cast(Any, None)))
    assert run_mmio(fd, vcpu, 0x0A00_0060, 4) == 1
    isr[0] = 3  # a configuration change: the next load sees it
    assert run_mmio(fd, vcpu, 0x0A00_0060, 4) == 3
    assert device.reads == []
    assert run_mmio(fd, vcpu, 0x0A00_0060, 1) == 0x77  # not a 32-bit load: the device's own read
    run_mmio(fd, vcpu, 0x0A00_0060, 4, is_write=True, data=5)
    assert run_mmio(fd, vcpu, 0x0A00_0064, 4) == 0x77  # the next register is not hot
    assert device.reads == [(0x60, 1), (0x64, 4)]
    assert device.writes == [(0x60, 4, 5)]


@pytest.mark.parametrize("addr", [0x0B00_0000, 0x0A00_0062, 0x0A00_01FE])
def test_a_hot_register_is_an_aligned_register_of_a_device_on_the_bus(addr: int) -> None:
    bus = MmioBus()
    bus.add(0x0A00_0000, 0x200, Registers(), "regs")
    with pytest.raises(VmmError, match="not an aligned register of a device on the bus"):
        bus.add_hot_register(addr, lambda: 0)

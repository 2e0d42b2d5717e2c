"""PSCI 1.1 serviced by pyvmm, with assembled SMP guests on real KVM, over both conduits."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest

from pyvmm.machine.vm import Vm
from pyvmm.smccc.context import ServiceVcpu
from pyvmm.smccc.service import PYVMM_UID, Service
from pyvmm.testing.payloads import MakePayloadVm, PayloadRun
from tests.kvm.conftest import guest, needs_filter, s32, s64

pytestmark = needs_filter("it tests pyvmm's own PSCI, served in Python")

SUCCESS, NOT_SUPPORTED, INVALID_PARAMETERS, DENIED, ALREADY_ON, INVALID_ADDRESS = 0, -1, -2, -3, -4, -9
ON, OFF = 0, 1
CPU_ON64, AFFINITY_INFO64 = 0xC400_0003, 0xC400_0004
UID_WORDS = tuple(int.from_bytes(PYVMM_UID[i:i + 4], "little") for i in range(0, 16, 4))
CONDUITS = ["hvc", "smc"]


def psci_guest(payload_vm: MakePayloadVm, name: str, conduit: str, cpus: int,
               trace: bool = True) -> tuple[Vm, PayloadRun]:
    run = payload_vm(guest(name), cpus=cpus, conduit=conduit, trace=trace)
    return run.vm, run


class HoldCpu2SecondBoot(Service):
    """Services hear of each CPU_ON boot on the booting vCPU's thread, before it has booted:
    holding cpu2's second boot there widens the window between CPU_ON's SUCCESS and the boot,
    which the guest must not be able to see."""

    name = "hold cpu2"

    def __init__(self) -> None:
        self.boots: Counter[int] = Counter()

    def power_on(self, vcpu: ServiceVcpu) -> None:
        self.boots[vcpu.index] += 1
        if vcpu.index == 2 and self.boots[2] == 2:
            time.sleep(0.5)


@pytest.mark.parametrize("conduit", CONDUITS)
def test_smp_bring_up_affinity_off_on_and_concurrent_cpu_on(payload_vm: MakePayloadVm, conduit: str) -> None:
    vm, run = psci_guest(payload_vm, "psci_smp", conduit, cpus=4)
    vm.smccc.add_service(HoldCpu2SecondBoot())
    result = run.run(150).result
    assert (result.reason, result.message) == ("poweroff", "PSCI SYSTEM_OFF"), result
    assert not run.tagged(0xBAD)

    assert run.tagged(1) == [(0x1_0001, 0, 0, 0, 0)]  # PSCI 1.1
    assert [(cpu, s64(r)) for cpu, r, *_ in run.tagged(2)] == [(1, OFF), (2, OFF), (3, OFF)]
    assert [(cpu, s64(r)) for cpu, r, *_ in run.tagged(3)] == [(1, SUCCESS), (2, SUCCESS), (3, SUCCESS), (1, SUCCESS)]
    assert [(cpu, s64(r)) for cpu, r, *_ in run.tagged(5)] == [(1, ON), (2, ON), (3, ON)]

    # every boot of a secondary: its MPIDR, the context ID its CPU_ON passed, its boot count
    checkins = [(index, mpidr, context, count) for mpidr, context, count, index, _ in run.tagged(4)]
    for index, mpidr, _, _ in checkins:
        assert mpidr == vm.vcpus[index].mpidr and mpidr & 0xFF == index
    first = sorted((i, ctx) for i, _, ctx, n in checkins if n == 1)
    assert first == [(1, 0x101), (2, 0x102), (3, 0x103)]
    assert [(ctx, n) for i, _, ctx, n in checkins if i == 1 and n == 2] == [(0x201, 2)]  # CPU_OFF, CPU_ON again
    assert [n for i, _, _, n in checkins if i == 1] == [1, 2, 3]
    assert [(ctx, n) for i, _, ctx, n in checkins if i == 2 and n == 2] == [(0x402, 2)]

    (state, polls, *_), = run.tagged(6)
    assert s64(state) == OFF and polls >= 1

    concurrent = sorted(s64(r) for r, *_ in run.tagged(7))
    assert concurrent == sorted([SUCCESS, ALREADY_ON, ALREADY_ON])

    (first_on, second_on, affinity, *_), = run.tagged(9)  # while the boot is held
    assert (s64(first_on), s64(second_on), s64(affinity)) == (SUCCESS, ALREADY_ON, ON)

    errors = {index: rest for index, *rest in run.tagged(10)}
    assert s64(errors[0][0]) == INVALID_PARAMETERS  # CPU_ON of an MPIDR no vCPU has
    assert s64(errors[1][0]) == ALREADY_ON
    assert s64(errors[2][0]) == INVALID_ADDRESS  # entry point outside RAM
    assert s64(errors[3][0]) == INVALID_PARAMETERS  # AFFINITY_INFO above level 0
    assert s32(errors[4][0]) == NOT_SUPPORTED  # CPU_FREEZE
    assert s32(errors[5][0]) == NOT_SUPPORTED  # unassigned PSCI ID
    assert s64(errors[6][0]) == NOT_SUPPORTED  # MIGRATE
    assert errors[7][0] == 2  # MIGRATE_INFO_TYPE: no Trusted OS
    assert (errors[8][0], s32(errors[9][0]), errors[10][0]) == (0, NOT_SUPPORTED, 0)  # PSCI_FEATURES
    assert s64(errors[11][0]) == DENIED  # SYSTEM_SUSPEND with other cores on
    assert s64(errors[12][0]) == INVALID_PARAMETERS  # CPU_SUSPEND with a reserved bit
    assert tuple(errors[13][:4]) == UID_WORDS  # Standard Secure Service Call UID
    assert tuple(errors[14][:2]) == (1, 1)  # its Revision: PSCI 1.1
    assert tuple(errors[15][:4]) == UID_WORDS  # Standard Hypervisor Service Call UID


class ParkCpu2WhileItIsCommanded:
    """Holds cpu2 out of the guest (a request on its own thread) from cpu0's second CPU_ON of cpu1
    until cpu0 asks AFFINITY_INFO about cpu2, or PARK_SECONDS pass: a secondary slow to take its
    command, as a loaded host makes one. Meanwhile cpu0 posts cpu2 the concurrent step's CPU_ON
    command; it must not post the ON_PENDING step's CPU_OFF before cpu2 has taken that one."""

    PARK_SECONDS = 2.0

    def __init__(self, vm: Vm) -> None:
        self.vm = vm
        self.parked, self.released = threading.Event(), threading.Event()
        self.unparked = False
        self.asked_while_parked = False

    def watch(self, vcpu: ServiceVcpu, function_id: int, flags: int) -> None:
        if vcpu.index != 0:
            return
        if function_id == CPU_ON64 and vcpu.get_x(1) == 1 and vcpu.get_x(3) == 0x201:
            self.vm.vcpus[2].request(self.park)
            assert self.parked.wait(30), "cpu2 did not leave the guest"
        elif function_id == AFFINITY_INFO64 and vcpu.get_x(1) == 2 and self.parked.is_set() and not self.unparked:
            self.asked_while_parked = True  # cpu0 is turning cpu2 off: its CPU_OFF command is posted
            self.released.set()

    def park(self, vcpu: ServiceVcpu) -> None:
        self.parked.set()
        self.released.wait(self.PARK_SECONDS)
        self.unparked = True


def test_a_secondary_slow_to_take_its_command_loses_none(payload_vm: MakePayloadVm) -> None:
    """psci_smp on a loaded host: a command posted before the last was taken overwrote it (cpu2
    skipped its CPU_ON) or, posted between cpu2's read and its clear, was lost (cpu0 polled
    AFFINITY_INFO(cpu2) for ever and the run hit its time limit)."""
    vm, run = psci_guest(payload_vm, "psci_smp", "hvc", cpus=4)
    vm.smccc.add_service(HoldCpu2SecondBoot())
    park = ParkCpu2WhileItIsCommanded(vm)
    vm.smccc.watch = park.watch
    result = run.run(150).result
    assert (result.reason, result.message) == ("poweroff", "PSCI SYSTEM_OFF"), result
    assert park.parked.is_set() and not park.asked_while_parked
    assert sorted(s64(r) for r, *_ in run.tagged(7)) == sorted([SUCCESS, ALREADY_ON, ALREADY_ON])
    assert [(ctx, n) for _, ctx, n, index, _ in run.tagged(4) if index == 2] == [(0x102, 1), (0x402, 2)]


RACE_ROUNDS = 150


@pytest.mark.parametrize("conduit", CONDUITS)
def test_concurrent_cpu_on_gives_one_success_and_already_on(payload_vm: MakePayloadVm, conduit: str) -> None:
    """kvm-unit-tests' psci race rule, round after round: three vCPUs CPU_ON a fourth at once."""
    vm, run = psci_guest(payload_vm, "psci_cpu_on_race", conduit, cpus=4, trace=False)  # the fast path's races
    vm.vcpus[0].set_x(9, RACE_ROUNDS)
    result = run.run(300).result
    assert (result.reason, result.message) == ("poweroff", "PSCI SYSTEM_OFF"), result
    assert run.tagged(2) == []  # (round, caller, CPU_ON, AFFINITY_INFO) of each broken answer
    assert run.tagged(1) == [(RACE_ROUNDS, RACE_ROUNDS, 2 * RACE_ROUNDS, 0, 0)]
    assert run.tagged(3)[0][0] == 0


@pytest.mark.parametrize("conduit", CONDUITS)
def test_cpu_suspend_and_system_suspend_wake_up(payload_vm: MakePayloadVm, conduit: str) -> None:
    vm, run = psci_guest(payload_vm, "psci_suspend", conduit, cpus=2)
    result = run.run(120).result
    assert result.reason == "poweroff", result
    assert not run.tagged(0xBAD)
    (context, current_el, daif, *_), = run.tagged(1)
    assert (context, current_el, daif) == (0x5EED, 1 << 2, 0xF << 6)  # at the entry point: EL1h, DAIF masked
    assert s64(run.tagged(2)[0][0]) == SUCCESS  # standby returned after the wake-up
    assert [s64(v) for v in run.tagged(3)[0][:3]] == [INVALID_PARAMETERS, INVALID_PARAMETERS, INVALID_ADDRESS]
    assert s64(run.tagged(4)[0][0]) == DENIED
    assert run.tagged(5)[0][0] == 0xCAFE  # SYSTEM_SUSPEND resumed at its entry point
    assert s64(run.tagged(6)[0][0]) == INVALID_ADDRESS


@pytest.mark.parametrize("conduit", CONDUITS)
def test_system_reset_restarts_the_guest(payload_vm: MakePayloadVm, conduit: str) -> None:
    vm, run = psci_guest(payload_vm, "psci_reset", conduit, cpus=2)
    result = run.run(120).result
    assert result.reason == "poweroff", result
    assert vm.resets == 2
    assert [v[:2] for v in run.values] == [(1, 1), (1, 2), (2, (1 << 64) + INVALID_PARAMETERS), (1, 3)]


def test_last_cpu_off_ends_the_run(payload_vm: MakePayloadVm) -> None:
    result = payload_vm(guest("cpu_off")).run(30).result
    assert result.reason == "halted"
    assert "every vCPU is off" in result.message

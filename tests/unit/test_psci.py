"""PSCI 1.1 state transitions and argument checks against a fake machine, through the dispatcher."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.machine.power import Entry, Power, PowerState
from pyvmm.services import psci as p
from pyvmm.services.psci import Psci
from pyvmm.services.std_hyp import StandardHypervisor
from pyvmm.smccc.dispatcher import Dispatcher
from pyvmm.smccc.service import PYVMM_UID
from tests import fuzzing
from tests.unit.fakes import FakeMachine, machine

U64, U32 = (1 << 64) - 1, (1 << 32) - 1
RAM = 0x8000_0000
ENTRY = RAM + 0x1000


def setup(cpus: int = 4) -> tuple[FakeMachine, Dispatcher]:
    m = machine(cpus)
    d = Dispatcher()
    d.add_service(Psci(m.context()))
    d.add_service(StandardHypervisor())
    return m, d


def call(m: FakeMachine, d: Dispatcher, fid: int, *args: int, cpu: int = 0) -> int | None:
    """Make the call from `cpu`; x0 as signed (None if the call wrote no result)."""
    v = m.vcpus[cpu]
    v.x.update({n + 1: a for n, a in enumerate(args)})
    v.writes.clear()
    d.dispatch(v, fid, 0)
    if not v.writes:
        return None
    x0 = v.writes[0][1]
    bits = 64 if fid & (1 << 30) else 32
    return x0 - (1 << bits) if x0 >> (bits - 1) else x0


CPU_ON64, CPU_ON32, AFFINITY64, AFFINITY32 = 0xC400_0003, 0x8400_0003, 0xC400_0004, 0x8400_0004


def test_version_and_migrate_info() -> None:
    m, d = setup()
    assert call(m, d, 0x8400_0000) == 0x1_0001
    assert call(m, d, 0x8400_0006) == 2
    assert call(m, d, 0xC400_0005, 1) == p.NOT_SUPPORTED
    assert call(m, d, 0xC400_0007) == p.NOT_SUPPORTED


def test_cpu_on_transitions() -> None:
    m, d = setup()
    target = m.vcpus[2]
    assert call(m, d, AFFINITY64, 2, 0) == Power.OFF
    assert call(m, d, CPU_ON64, 2, ENTRY, 0xC0FFEE) == p.SUCCESS
    assert target.power == Power.ON_PENDING  # its thread has not booted it yet ...
    assert call(m, d, AFFINITY64, 2, 0) == Power.ON  # ... which the guest cannot tell
    assert call(m, d, CPU_ON64, 2, ENTRY, 0) == p.ALREADY_ON
    assert target.boot_pending() == Entry(ENTRY, 0xC0FFEE)  # its thread boots it there
    assert call(m, d, CPU_ON64, 2, ENTRY, 0) == p.ALREADY_ON
    assert call(m, d, AFFINITY64, 2, 0) == Power.ON


def test_a_power_on_waiting_for_a_stopping_vcpu_is_on_pending() -> None:
    m, d = setup()
    assert call(m, d, CPU_ON64, 2, ENTRY, 0) == p.SUCCESS
    m.vcpus[2].stop()  # the machine stops before vCPU 2's thread could boot it
    assert call(m, d, AFFINITY64, 2, 0) == Power.ON_PENDING
    assert call(m, d, CPU_ON64, 2, ENTRY, 0) == p.ON_PENDING


@pytest.mark.parametrize(("fid", "target", "entry", "expected"), [
    (CPU_ON64, 9, ENTRY, p.INVALID_PARAMETERS),  # no such core
    (CPU_ON64, 1 | (1 << 32), ENTRY, p.INVALID_PARAMETERS),  # Aff3 = 1: no such core
    (CPU_ON64, 1 | (1 << 24), ENTRY, p.INVALID_PARAMETERS),  # bits outside the affinity fields
    (CPU_ON64, 1, 0x1000, p.INVALID_ADDRESS),  # entry point below RAM
    (CPU_ON64, 1, RAM + 0x100_0000, p.INVALID_ADDRESS),  # just past RAM
    (CPU_ON32, 1 | (1 << 32), ENTRY, p.SUCCESS),  # SMC32: only w1 counts, Aff3 is not there
])
def test_cpu_on_argument_checks(fid: int, target: int, entry: int, expected: int) -> None:
    m, d = setup()
    assert call(m, d, fid, target, entry, 0) == expected


class SlowPowerState(PowerState):
    """A power state whose every read takes 10 ms, as a thread preempted between reading and
    writing it would: concurrent CPU_ONs all overlap there, so only a lock makes one win."""

    def __getattribute__(self, name: str) -> Any:
        value = super().__getattribute__(name)
        if name == "_state":
            time.sleep(0.01)  # between reading the state and acting on it
        return value


def test_concurrent_cpu_on_has_exactly_one_success() -> None:
    m, d = setup(cpus=8)
    for v in m.vcpus:
        v.set_power(on=v.index != 1)
    m.vcpus[1]._power = SlowPowerState(on=False)
    barrier = threading.Barrier(7)
    results: list[int | None] = []

    def caller(cpu: int) -> None:
        barrier.wait()
        results.append(call(m, d, CPU_ON64, 1, ENTRY, cpu, cpu=cpu))

    threads = [threading.Thread(target=caller, args=(c,)) for c in (0, 2, 3, 4, 5, 6, 7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # one wins; the rest see the target ON, never a window of pyvmm's making (kvm-unit-tests' psci)
    assert sorted(r for r in results if r is not None) == [p.ALREADY_ON] * 6 + [p.SUCCESS]  # a None would make it short
    winner = m.vcpus[1].boot_pending()
    assert isinstance(winner, Entry) and winner.address == ENTRY


def test_affinity_info_checks() -> None:
    m, d = setup()
    assert call(m, d, AFFINITY64, 0, 0) == Power.ON
    assert call(m, d, AFFINITY64, 0, 1) == p.INVALID_PARAMETERS
    assert call(m, d, AFFINITY64, 0x80, 0) == p.INVALID_PARAMETERS
    assert call(m, d, AFFINITY32, 3, 0) == Power.OFF


def test_cpu_off_does_not_return() -> None:
    m, d = setup()
    m.vcpus[1].set_power(on=True)
    assert call(m, d, 0x8400_0002, cpu=1) is None
    assert m.vcpus[1].power == Power.OFF


@pytest.mark.parametrize(("power_state", "entry", "expected", "suspends"), [
    (0, 0, p.SUCCESS, [None]),  # standby
    (1 << 16, ENTRY, p.SUCCESS, [Entry(ENTRY, 0x77)]),  # power-down, resumes at entry
    (1 << 16, 0x10, p.INVALID_ADDRESS, []),
    (1 << 20, 0, p.INVALID_PARAMETERS, []),  # reserved bit
    (1 << 24, 0, p.INVALID_PARAMETERS, []),  # power level 1: no clusters here
])
def test_cpu_suspend(power_state: int, entry: int, expected: int, suspends: list[Entry | None]) -> None:
    m, d = setup()
    assert call(m, d, 0xC400_0001, power_state, entry, 0x77) == expected
    assert m.vcpus[0].suspends == suspends


def test_system_suspend_needs_every_other_core_off() -> None:
    m, d = setup()
    assert m.vcpus[3].request_on(Entry(ENTRY, 0)) is None  # ON_PENDING
    assert call(m, d, 0xC400_000E, ENTRY, 5) == p.DENIED
    m.vcpus[3].set_power(on=False)
    assert call(m, d, 0xC400_000E, 0x10, 5) == p.INVALID_ADDRESS
    assert call(m, d, 0xC400_000E, ENTRY, 5) == p.SUCCESS
    assert m.vcpus[0].suspends == [Entry(ENTRY, 5)]


def test_system_off_reset_and_reset2() -> None:
    m, d = setup()
    assert call(m, d, 0xC400_0012, 0x8000_0000, 0) == p.INVALID_PARAMETERS  # vendor reset type
    assert call(m, d, 0xC400_0012, 1, 0) == p.INVALID_PARAMETERS  # reserved architectural type
    assert call(m, d, 0xC400_0012, 0, 0) is None
    assert call(m, d, 0x8400_0009) is None
    assert call(m, d, 0x8400_0008) is None
    assert [e[0] for e in m.system.events] == ["reset", "reset", "off"]


def test_features() -> None:
    m, d = setup()
    for fid in (0x8400_0000, 0x8400_0001, 0xC400_0001, 0x8400_0002, CPU_ON64, AFFINITY32, 0x8400_0008,
                0x8400_0009, 0x8400_000A, 0xC400_000E, 0xC400_0012, 0x8000_0000):
        assert call(m, d, 0x8400_000A, fid) == p.SUCCESS, hex(fid)
    for fid in (0x8400_000B, 0x8400_000C, 0x8400_000D, 0x8400_000F, 0x8400_0010, 0x8400_0013, 0xC400_0000,
                0xC400_0020, 0x8600_0000, 0x8400_0005, 0xC400_0005, 0x8400_0007, 0xC400_0007):  # MIGRATE*: no TOS
        assert call(m, d, 0x8400_000A, fid) == p.NOT_SUPPORTED, hex(fid)


def test_unassigned_psci_ids_are_not_supported() -> None:
    m, d = setup()
    for fid in (0x8400_000B, 0x8400_0013, 0x8400_001F, 0xC400_0000, 0xC400_001F):
        assert call(m, d, fid) == p.NOT_SUPPORTED


def test_general_service_queries() -> None:
    m, d = setup()
    uid = tuple(int.from_bytes(PYVMM_UID[i:i + 4], "little") for i in range(0, 16, 4))
    v = m.vcpus[0]
    for owner in (4, 5):
        base = 0x8000_FF00 | owner << 24
        d.dispatch(v, base + 1, 0)
        assert tuple(value for _, value in v.writes[-4:]) == uid
        v.writes.clear()
    assert call(m, d, 0x8400_FF00) == 16  # PSCI's function IDs: 6 functions SMC32 only, 5 in both conventions
    assert call(m, d, 0x8500_FF00) == 0
    assert call(m, d, 0x8400_FF02) == p.NOT_SUPPORTED  # reserved query
    v.writes.clear()
    d.dispatch(v, 0x8400_FF03, 0)
    assert [value for _, value in v.writes] == [1, 1]
    assert (0x8400_FF00, 4) in [(r.base, r.size) for r in d.filter_ranges()]


@pytest.mark.fuzz
@settings(max_examples=fuzzing.size(400, 20_000), deadline=None, database=None)
@given(fid=st.integers(0, U32), args=st.lists(st.integers(0, U64), min_size=6, max_size=6),
       conduit=st.sampled_from([0, 1]))
def test_any_call_gets_a_conformant_answer(fid: int, args: list[int], conduit: int) -> None:
    m, d = setup()
    v = m.vcpus[1]
    v.set_power(on=True)
    v.x.update({n + 1: a for n, a in enumerate(args)})
    d.dispatch(v, fid, conduit)
    width = U64 if fid & (1 << 30) else U32
    assert all(value <= width for _, value in v.writes)  # SMC32 results are 32-bit
    assert all(n <= 3 for n, _ in v.writes)  # only x0..x3, never x4..x17
    if conduit == 1 or d.resolve(fid) is None:
        assert v.writes == [(0, width)]  # NOT_SUPPORTED
    elif v.writes:
        x0 = v.writes[0][1]
        signed = x0 - (width + 1) if x0 > width >> 1 else x0
        assert signed >= -9  # a PSCI/SMCCC status or a value, never an undefined error
    fuzzing.tally("PSCI and the General Service Queries").add("calls")


def test_call_count_includes_the_trng_functions_kvm_answers() -> None:
    """Owner 4's Call Count covers all of its functions the guest can call: pyvmm's PSCI and
    KVM's own TRNG (DEN0098), less any TRNG ID the user denies."""
    from pyvmm.smccc.function_id import TRNG_FUNCTIONS, Owner

    m, d = setup()
    assert call(m, d, 0x8400_FF00) == 16
    d.kernel_functions[Owner.STANDARD_SECURE] = TRNG_FUNCTIONS
    assert call(m, d, 0x8400_FF00) == 16 + 5
    d.deny(0x8400_0053, 1, "no 32-bit TRNG_RND")
    assert call(m, d, 0x8400_FF00) == 16 + 4

"""SDEI 1.1: calls, the handler state machine, dispatch and completion, against fake vCPUs
whose registers live in a dict (the real-KVM side is tests/kvm/test_sdei.py)."""

from __future__ import annotations

from typing import Literal, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.errors import VmmError
from pyvmm.machine.power import Entry
from pyvmm.services.sdei import EventSpec, Sdei, exception_pstate, parse_event
from pyvmm.services.sdei import events as s
from pyvmm.smccc.context import TraceEvent
from pyvmm.smccc.dispatcher import Dispatcher
from pyvmm.smccc.trace import format_record
from tests.unit.fakes import FakeMachine, FakeVcpu, machine

F = s.FN_BASE
VERSION, REGISTER, ENABLE, DISABLE, CONTEXT, COMPLETE, RESUME, UNREGISTER, STATUS, INFO, ROUTING, \
    MASK, UNMASK, BIND, RELEASE, SIGNAL, FEATURES, PRIVATE_RESET, SHARED_RESET = range(F, F + 0x13)
HANDLER, HANDLER2, ARG = 0x8000_1000, 0x8000_2000, 0xA4A4
PC, PSTATE = 0x8000_0444, 0x3C5 & ~0x80  # interrupted: EL1h with IRQs unmasked
CRITICAL, SHARED = 100, 200
U64 = (1 << 64) - 1


def setup(cpus: int = 2, events: tuple[EventSpec, ...] = (EventSpec(CRITICAL, critical=True),
                                                          EventSpec(SHARED, shared=True))
          ) -> tuple[FakeMachine, Dispatcher, Sdei]:
    m = machine(cpus, all_on=True)
    d = Dispatcher()
    sdei = Sdei(m.context(d.emit), events)
    d.add_service(sdei)
    for v in m.vcpus:
        for n in range(18):
            v.set_reg(f"x{n}", 0x1000 + n)
        v.set_reg("pc", PC)
        v.set_reg("pstate", PSTATE)
        v.set_reg("sctlr_el1", 1 << 23)  # SPAN: PAN unchanged on exceptions
    return m, d, sdei


def call(d: Dispatcher, v: FakeVcpu, fid: int, *args: int) -> int | None:
    """x0 as a signed number; None when the call wrote no result (COMPLETE)."""
    for n, a in enumerate(args, 1):
        v.set_reg(f"x{n}", a & U64)
    v.writes.clear()
    d.dispatch(v, fid, 0)
    if not v.writes:
        return None
    x0 = v.writes[0][1]
    return x0 - (1 << 64) if x0 >> 63 else x0


def ready(d: Dispatcher, v: FakeVcpu, event: int = 0, entry: int = HANDLER, arg: int = ARG,
          flags: int = 0, affinity: int = 0) -> None:
    assert call(d, v, REGISTER, event, entry, arg, flags, affinity) == s.SUCCESS
    assert call(d, v, ENABLE, event) == s.SUCCESS
    for n in range(2, 18):
        v.set_reg(f"x{n}", 0x1000 + n)  # back to recognisable values


def in_handler(d: Dispatcher, v: FakeVcpu) -> None:
    """Event 0 registered, enabled, signalled to an unmasked `v` and dispatched: its handler runs."""
    ready(d, v)
    call(d, v, UNMASK)
    call(d, v, SIGNAL, 0, v.mpidr)
    assert v.settle() == 1


def test_version_and_features() -> None:
    m, d, _ = setup()
    v = m.vcpus[0]
    assert call(d, v, VERSION) == 1 << 48 | 1 << 32
    assert call(d, v, FEATURES, 0) == s.BIND_SLOTS << 16  # shared slots only
    assert call(d, v, FEATURES, 1) == 0  # no relative mode
    assert call(d, v, FEATURES, 2) == s.INVALID_PARAMETERS
    assert call(d, v, F + 0x13) == -1  # one past SHARED_RESET: not an SDEI function


def test_register_argument_checks() -> None:
    m, d, _ = setup()
    v = m.vcpus[0]
    assert call(d, v, REGISTER, 7, HANDLER, 0, 0, 0) == s.INVALID_PARAMETERS  # no such event
    assert call(d, v, REGISTER, 0, 0, 0, 0, 0) == s.INVALID_PARAMETERS  # no entry point
    assert call(d, v, REGISTER, 0, HANDLER + 2, 0, 0, 0) == s.INVALID_PARAMETERS  # misaligned
    assert call(d, v, REGISTER, 0, HANDLER, 0, s.RELATIVE_MODE, 0) == s.INVALID_PARAMETERS
    assert call(d, v, REGISTER, 0, HANDLER, 0, 1 << 5, 0) == s.INVALID_PARAMETERS  # reserved flag
    assert call(d, v, REGISTER, SHARED, HANDLER, 0, s.ROUTE_PE, 0x77) == s.INVALID_PARAMETERS  # no such PE
    assert call(d, v, REGISTER, 0, HANDLER, 0, s.ROUTE_PE, 0x77) == s.SUCCESS  # private: routing ignored
    assert call(d, v, REGISTER, 0, HANDLER, 0, 0, 0) == s.DENIED  # already registered
    assert call(d, v, REGISTER, 1 << 32, HANDLER, 0, 0, 0) == s.DENIED  # x1 is 32 bits: event 0 again
    assert call(d, v, STATUS, 0) == s.REGISTERED
    assert call(d, m.vcpus[1], STATUS, 0) == 0  # private: cpu1 has its own


def test_state_machine_without_dispatch() -> None:
    m, d, _ = setup()
    v = m.vcpus[0]
    assert call(d, v, ENABLE, 0) == s.DENIED  # not registered
    assert call(d, v, DISABLE, 0) == s.DENIED
    assert call(d, v, UNREGISTER, 0) == s.DENIED
    assert call(d, v, STATUS, 99) == s.INVALID_PARAMETERS
    assert call(d, v, REGISTER, SHARED, HANDLER, 0, 0, 0) == s.SUCCESS
    assert call(d, v, ROUTING, SHARED, s.ROUTE_PE, m.vcpus[1].mpidr) == s.SUCCESS  # registered, disabled
    assert call(d, v, ENABLE, SHARED) == s.SUCCESS
    assert call(d, v, ENABLE, SHARED) == s.SUCCESS  # enabling twice is allowed
    assert call(d, v, STATUS, SHARED) == s.REGISTERED | s.ENABLED
    assert call(d, v, ROUTING, SHARED, 0, 0) == s.DENIED  # not while enabled
    assert call(d, v, DISABLE, SHARED) == s.SUCCESS
    assert call(d, v, ROUTING, SHARED, 2, 0) == s.INVALID_PARAMETERS  # reserved mode bit
    assert call(d, v, ROUTING, 0, 0, 0) == s.INVALID_PARAMETERS  # private event
    assert call(d, v, UNREGISTER, SHARED) == s.SUCCESS
    assert call(d, v, STATUS, SHARED) == 0


def test_get_info() -> None:
    m, d, _ = setup()
    v = m.vcpus[0]
    assert [call(d, v, INFO, 0, i) for i in range(3)] == [0, 1, 0]  # private, signalable, normal
    assert [call(d, v, INFO, CRITICAL, i) for i in range(3)] == [0, 0, 1]
    assert [call(d, v, INFO, SHARED, i) for i in range(3)] == [1, 0, 0]
    assert call(d, v, INFO, 0, s.INFO_ROUTING_MODE) == s.INVALID_PARAMETERS  # private
    assert call(d, v, INFO, SHARED, s.INFO_ROUTING_MODE) == s.DENIED  # not registered
    assert call(d, v, REGISTER, SHARED, HANDLER, 0, s.ROUTE_PE, m.vcpus[1].mpidr) == s.SUCCESS
    assert call(d, v, INFO, SHARED, s.INFO_ROUTING_MODE) == 1
    assert call(d, v, INFO, SHARED, s.INFO_ROUTING_AFF) == m.vcpus[1].mpidr & s.MPIDR_AFF_MASK
    assert call(d, v, INFO, SHARED, 5) == s.INVALID_PARAMETERS
    assert call(d, v, INFO, 5000, 0) == s.INVALID_PARAMETERS


def test_signal_dispatches_with_the_interrupted_context() -> None:
    m, d, sdei = setup()
    v = m.vcpus[0]
    ready(d, v)
    assert call(d, v, UNMASK) == s.SUCCESS
    assert call(d, v, SIGNAL, 0, v.mpidr) == s.SUCCESS
    assert v.reg("pc") == PC  # nothing happens until the call has been answered
    assert v.settle() == 1
    assert (v.reg("x0"), v.reg("x1"), v.reg("x2"), v.reg("x3")) == (0, ARG, PC, PSTATE)
    assert v.reg("pc") == HANDLER
    assert v.reg("pstate") == 0x3C5  # EL1h, DAIF masked; PAN kept clear (SCTLR_EL1.SPAN)
    assert call(d, v, STATUS, 0) == s.REGISTERED | s.ENABLED | s.RUNNING
    # EVENT_CONTEXT: the interrupted x0 was SIGNAL's result, x1.. what the guest had
    assert call(d, v, CONTEXT, 0) == 0
    assert call(d, v, CONTEXT, 1) == 0  # x1: the event number argument of SIGNAL
    assert call(d, v, CONTEXT, 17) == 0x1000 + 17
    assert call(d, v, CONTEXT, 18) == s.INVALID_PARAMETERS
    for n in range(4, 18):
        v.set_reg(f"x{n}", 0xDEAD)  # the handler clobbers registers
    assert call(d, v, COMPLETE, 0) is None  # no result: the context is restored instead
    assert v.reg("pc") == PC and v.reg("pstate") == PSTATE
    assert [v.reg(f"x{n}") for n in range(4, 18)] == [0x1000 + n for n in range(4, 18)]
    assert call(d, v, STATUS, 0) == s.REGISTERED | s.ENABLED
    assert sdei.dispatches == 1 and v.settle() == 0


def test_complete_and_resume() -> None:
    m, d, _ = setup()
    v = m.vcpus[0]
    in_handler(d, v)
    assert call(d, v, RESUME, HANDLER2) is None
    assert v.reg("pc") == HANDLER2
    assert (v.reg("elr_el1"), v.reg("spsr_el1")) == (PC, PSTATE)
    assert v.reg("pstate") == 0x3C5
    assert v.reg("x0") == 0 and v.reg("x5") == 0x1005


def test_handler_pstate_follows_exception_entry() -> None:
    span, dssbs = 1 << 23, 1 << 44
    assert exception_pstate(0x6000_0000, 0) == 0x6000_0000 | 0x3C5 | 1 << 22  # NZCV kept, PAN set
    assert exception_pstate(0x3C5 | 1 << 22, span) == 0x3C5 | 1 << 22  # PAN unchanged with SPAN
    assert exception_pstate(0, span | dssbs) == 0x3C5 | 1 << 12  # SSBS from DSSBS
    assert exception_pstate(1 << 21 | 1 << 20 | 3 << 10, span) == 0x3C5  # SS, IL, BTYPE cleared
    assert exception_pstate(0x10 | 1 << 24, span) == 0x3C5  # AArch32 EL0: bit 24 is not DIT


def test_no_result_without_a_running_handler() -> None:
    m, d, _ = setup()
    v = m.vcpus[0]
    assert call(d, v, COMPLETE, 0) == s.DENIED
    assert call(d, v, RESUME, HANDLER2) == s.DENIED
    assert call(d, v, CONTEXT, 0) == s.DENIED


def test_masked_pe_defers_until_unmask() -> None:
    m, d, _ = setup()
    v = m.vcpus[0]
    ready(d, v)
    assert call(d, v, SIGNAL, 0, v.mpidr) == s.SUCCESS  # PEs start masked
    assert v.settle() == 0 and v.reg("pc") == PC
    assert call(d, v, UNMASK) == s.SUCCESS
    assert v.settle() == 1 and v.reg("pc") == HANDLER
    assert v.reg("x0") == 0  # the interrupted x0: UNMASK's result


def test_pe_mask_reports_whether_it_changed_anything() -> None:
    m, d, sdei = setup()
    v = m.vcpus[0]
    assert call(d, v, MASK) == 0  # already masked
    call(d, v, UNMASK)
    assert not sdei.masked(0)
    assert call(d, v, MASK) == 1
    assert sdei.masked(0)


def test_disabled_event_stays_pending_until_enabled() -> None:
    m, d, _ = setup()
    v = m.vcpus[0]
    call(d, v, REGISTER, 0, HANDLER, ARG, 0, 0)
    call(d, v, UNMASK)
    call(d, v, SIGNAL, 0, v.mpidr)
    assert v.settle() == 0
    assert call(d, v, ENABLE, 0) == s.SUCCESS
    assert v.settle() == 1 and v.reg("pc") == HANDLER


def test_critical_preempts_normal_and_normal_waits() -> None:
    m, d, sdei = setup()
    v = m.vcpus[0]
    ready(d, v)
    ready(d, v, CRITICAL, HANDLER2, 0xC)
    call(d, v, UNMASK)
    call(d, v, SIGNAL, 0, v.mpidr)
    v.settle()
    assert v.reg("pc") == HANDLER
    v.set_reg("pc", HANDLER + 0x40)  # the normal handler ran a little
    assert call(d, v, SIGNAL, 0, v.mpidr) == s.SUCCESS  # same priority: waits
    assert v.settle() == 0 and v.reg("pc") == HANDLER + 0x40
    assert sdei.trigger(CRITICAL, cpu=0)
    assert v.settle() == 1
    assert v.reg("pc") == HANDLER2 and v.reg("x2") == HANDLER + 0x40 and v.reg("x1") == 0xC
    assert call(d, v, CONTEXT, 0) == 0  # the critical handler's context: the normal handler's
    assert call(d, v, COMPLETE, 0) is None
    assert v.reg("pc") == HANDLER + 0x40  # back in the normal handler
    assert v.settle() == 0  # event 0 is running: its second signal still waits
    assert call(d, v, COMPLETE, 0) is None
    assert v.reg("pc") == PC
    assert v.settle() == 1 and v.reg("pc") == HANDLER  # now the pending event 0
    assert sdei.dispatches == 3


def test_critical_pending_preempts_the_normal_entered_with_it() -> None:
    m, d, sdei = setup()
    v = m.vcpus[0]
    ready(d, v)
    ready(d, v, CRITICAL, HANDLER2)
    call(d, v, SIGNAL, 0, v.mpidr)
    sdei.trigger(CRITICAL, cpu=0)
    call(d, v, UNMASK)  # both due at once: critical first, then nothing (normal must wait)
    v.settle()
    assert v.reg("pc") == HANDLER2 and v.reg("x2") == PC
    call(d, v, COMPLETE, 0)
    v.settle()
    assert v.reg("pc") == HANDLER and v.reg("x2") == PC


def test_unregister_while_running_is_pending() -> None:
    m, d, _ = setup()
    v = m.vcpus[0]
    in_handler(d, v)
    assert call(d, v, UNREGISTER, 0) == s.PENDING
    assert call(d, v, STATUS, 0) == s.RUNNING  # unregister-pending
    assert call(d, v, UNREGISTER, 0) == s.PENDING
    assert call(d, v, ENABLE, 0) == s.DENIED
    assert call(d, v, REGISTER, 0, HANDLER, 0, 0, 0) == s.DENIED
    assert call(d, v, PRIVATE_RESET) == s.DENIED  # a handler is running
    assert call(d, v, CONTEXT, 2) == v.mpidr  # SIGNAL's target_pe
    assert call(d, v, CONTEXT, 3) == 0x1003
    assert call(d, v, COMPLETE, 0) is None
    assert call(d, v, STATUS, 0) == 0
    assert call(d, v, SIGNAL, 0, v.mpidr) == s.SUCCESS  # signalled while unregistered: dropped
    assert v.settle() == 0


def test_private_and_shared_reset() -> None:
    m, d, _ = setup()
    v = m.vcpus[0]
    ready(d, v)
    ready(d, v, SHARED)
    assert call(d, v, PRIVATE_RESET) == s.SUCCESS
    assert call(d, v, STATUS, 0) == 0 and call(d, v, STATUS, SHARED) == 3
    assert call(d, v, BIND, 40) == 1000
    assert call(d, v, SHARED_RESET) == s.SUCCESS
    assert call(d, v, STATUS, SHARED) == 0
    assert call(d, v, STATUS, 1000) == s.INVALID_PARAMETERS  # bindings released too


def test_shared_event_routing() -> None:
    m, d, sdei = setup(cpus=3)
    v0, v1, v2 = m.vcpus
    for v in m.vcpus:
        call(d, v, UNMASK)
    ready(d, v0, SHARED, flags=s.ROUTE_PE, affinity=v2.mpidr)
    assert sdei.trigger(SHARED)
    assert (v0.settle(), v1.settle(), v2.settle()) == (0, 0, 1)
    assert v2.reg("pc") == HANDLER
    assert call(d, v0, COMPLETE, 0) == s.DENIED  # the handler runs on cpu2, not here
    assert call(d, v2, COMPLETE, 0) is None
    call(d, v0, DISABLE, SHARED)
    assert call(d, v0, ROUTING, SHARED, 0, 0) == s.SUCCESS  # any PE
    call(d, v0, ENABLE, SHARED)
    call(d, v1, MASK)
    call(d, v2, MASK)
    sdei.trigger(SHARED)
    assert (v1.settle(), v2.settle(), v0.settle()) == (0, 0, 1)  # the only unmasked PE takes it
    assert v0.reg("pc") == HANDLER


def test_shared_event_runs_once_at_a_time() -> None:
    m, d, sdei = setup()
    v0, v1 = m.vcpus
    for v in m.vcpus:
        call(d, v, UNMASK)
    ready(d, v0, SHARED)
    sdei.trigger(SHARED)
    v0.settle()
    v1.settle()
    assert sdei.dispatches == 1
    sdei.trigger(SHARED)  # pending again while it runs
    assert v1.settle() == 0
    assert call(d, v1 if v1.reg("pc") == HANDLER else v0, COMPLETE, 0) is None
    v0.settle()
    v1.settle()
    assert sdei.dispatches == 2  # both PEs were asked to look; one took it


def shared_handler_running_on_cpu1() -> tuple[FakeMachine, Dispatcher, Sdei]:
    """A machine whose cpu1 is in the handler of the shared event, routed to it alone."""
    m, d, sdei = setup()
    v0, v1 = m.vcpus
    call(d, v1, UNMASK)
    ready(d, v0, SHARED, flags=s.ROUTE_PE, affinity=v1.mpidr)
    sdei.trigger(SHARED)
    assert v1.settle() == 1
    return m, d, sdei


def test_a_pe_powering_off_inside_a_shared_handler_does_not_leave_it_running() -> None:
    m, d, sdei = shared_handler_running_on_cpu1()
    v0, v1 = m.vcpus
    assert call(d, v0, STATUS, SHARED) == s.REGISTERED | s.ENABLED | s.RUNNING
    sdei.trigger(SHARED)  # pending again while it runs
    v1.power_off()  # PSCI CPU_OFF inside the handler
    d.powered_off(v1)
    assert call(d, v0, STATUS, SHARED) == s.REGISTERED | s.ENABLED  # no longer running
    assert v0.settle() == 0  # routed to the PE that is off: it waits
    assert call(d, v0, UNREGISTER, SHARED) == s.SUCCESS
    assert call(d, v0, SHARED_RESET) == s.SUCCESS  # not DENIED for ever


def test_a_cpu_on_heard_before_the_cpu_off_still_ends_its_handlers() -> None:
    """Another PE's CPU_ON may boot the PE before its thread reports the CPU_OFF: the power-on
    then ends what it was running, or the shared event would stay RUNNING for ever."""
    m, d, sdei = shared_handler_running_on_cpu1()
    v0, v1 = m.vcpus
    v1.power_off()  # CPU_OFF inside the handler, not reported yet
    d.power_on(v1)  # the CPU_ON that boots it again is
    assert call(d, v0, STATUS, SHARED) == s.REGISTERED | s.ENABLED
    assert call(d, v0, UNREGISTER, SHARED) == s.SUCCESS


def test_the_exit_loop_tells_services_of_a_cpu_off() -> None:
    """MachineExits.turned_off, which the vCPU thread calls after a CPU_OFF, reaches SDEI."""
    from pyvmm.devices.bus import MmioBus
    from pyvmm.machine.exit_dispatch import MachineExits, UnhandledMmio
    from pyvmm.machine.lifecycle import Lifecycle
    from pyvmm.machine.vcpu import Vcpu

    m, d, sdei = shared_handler_running_on_cpu1()
    v0, v1 = m.vcpus
    exits = MachineExits(d, MmioBus(), UnhandledMmio("ignore"), cast(Lifecycle, None))  # v0 stays on: no finish()
    exits.vcpus = cast(list[Vcpu], m.vcpus)
    v1.power_off()
    exits.turned_off(cast(Vcpu, v1))
    assert call(d, v0, STATUS, SHARED) == s.REGISTERED | s.ENABLED


def test_interrupt_bind_and_release() -> None:
    m, d, _ = setup()
    v = m.vcpus[0]
    assert call(d, v, BIND, 3) == s.INVALID_PARAMETERS  # SGI
    assert call(d, v, BIND, 27) == s.OUT_OF_RESOURCE  # PPI: no private slots
    assert call(d, v, BIND, 256) == s.INVALID_PARAMETERS
    assert call(d, v, BIND, 52) == s.INVALID_PARAMETERS  # an irqfd line: KVM signals it, not pyvmm
    assert call(d, v, BIND, 40) == 1000
    assert call(d, v, BIND, 40) == 1000  # bound already: the same event
    assert call(d, v, INFO, 1000, s.INFO_TYPE) == 1
    assert call(d, v, RELEASE, 0) == s.INVALID_PARAMETERS  # not a bound event
    assert call(d, v, REGISTER, 1000, HANDLER, 0, 0, 0) == s.SUCCESS
    assert call(d, v, RELEASE, 1000) == s.DENIED  # registered
    assert call(d, v, UNREGISTER, 1000) == s.SUCCESS
    assert call(d, v, RELEASE, 1000) == s.SUCCESS
    assert call(d, v, STATUS, 1000) == s.INVALID_PARAMETERS
    for n in range(s.BIND_SLOTS):
        assert call(d, v, BIND, 32 + n) == 1000 + n
    assert call(d, v, BIND, 32 + s.BIND_SLOTS) == s.OUT_OF_RESOURCE


def test_bound_interrupt_is_level_sensitive_and_leaves_the_gic() -> None:
    m, d, sdei = setup()
    v = m.vcpus[0]
    assert not sdei.interrupt(40, True)  # not bound: the vGIC's
    assert call(d, v, BIND, 40) == 1000
    assert not sdei.interrupt(40, True)  # bound but not registered: still the vGIC's
    assert call(d, v, REGISTER, 1000, HANDLER, 0, 0, 0) == s.SUCCESS
    assert m.lines.gic_lines == [(40, False)]  # taken from the vGIC, asserted: pending
    call(d, v, ENABLE, 1000)
    call(d, v, UNMASK)
    assert v.settle() == 1 and v.reg("x0") == 1000
    call(d, v, COMPLETE, 0)
    assert v.settle() == 1  # still asserted: it fires again
    assert sdei.interrupt(40, False)  # the handler quietened the device
    call(d, v, COMPLETE, 0)
    assert v.settle() == 0
    assert sdei.interrupt(40, True)
    assert v.settle() == 1
    call(d, v, COMPLETE, 0)
    sdei.interrupt(40, True)
    call(d, v, DISABLE, 1000)
    assert call(d, v, UNREGISTER, 1000) == s.SUCCESS
    assert m.lines.gic_lines[-1] == (40, True)  # back to the vGIC, still asserted


def test_signal_checks() -> None:
    m, d, _ = setup()
    v = m.vcpus[0]
    assert call(d, v, SIGNAL, CRITICAL, v.mpidr) == s.INVALID_PARAMETERS  # only event 0
    assert call(d, v, SIGNAL, 0, 0x99) == s.INVALID_PARAMETERS  # no such PE
    ready(d, m.vcpus[1])
    call(d, m.vcpus[1], UNMASK)
    assert call(d, v, SIGNAL, 0, m.vcpus[1].mpidr) == s.SUCCESS  # to another PE
    assert m.vcpus[1].settle() == 1 and v.settle() == 0


def test_host_trigger_checks() -> None:
    m, d, sdei = setup()
    with pytest.raises(VmmError, match="no SDEI event 5"):
        sdei.trigger(5, cpu=0)
    with pytest.raises(VmmError, match="private"):
        sdei.trigger(CRITICAL)
    with pytest.raises(VmmError, match="shared"):
        sdei.trigger(SHARED, cpu=1)
    assert not sdei.trigger(CRITICAL, cpu=1)  # unregistered: dropped
    rows = sdei.status()
    assert {"event": 0, "where": "vcpu0", "critical": False, "state": "unregistered", "pending": False,
            "interrupt": None} in rows


def test_off_and_power_down_suspended_pes_defer() -> None:
    m, d, sdei = setup()
    v = m.vcpus[1]
    ready(d, v)
    call(d, v, UNMASK)
    v.suspend(Entry(HANDLER2, 0))  # in power-down suspend
    sdei.trigger(0, cpu=1)
    assert v.settle() == 0
    v.suspended, v.resume_at = False, None  # woken at its resume entry
    sdei.woken(v)
    assert v.settle() == 1
    call(d, v, COMPLETE, 0)
    v.set_power(on=False)
    sdei.trigger(0, cpu=1)
    assert v.settle() == 0


def test_standby_pe_is_woken() -> None:
    m, d, sdei = setup()
    v = m.vcpus[0]
    ready(d, v)
    call(d, v, UNMASK)
    v.suspend(None)  # standby
    sdei.trigger(0, cpu=0)
    assert v.settle() == 1
    assert not v.suspended and v.reg("pc") == HANDLER


def test_cpu_on_masks_and_forgets_private_events() -> None:
    m, d, sdei = setup()
    v = m.vcpus[1]
    ready(d, v)
    call(d, v, UNMASK)
    ready(d, v, SHARED)
    sdei.power_on(v)
    assert sdei.masked(1)
    assert call(d, v, STATUS, 0) == 0
    assert call(d, v, STATUS, SHARED) == 3  # shared events are not the PE's


def test_reset_forgets_everything() -> None:
    m, d, sdei = setup()
    v = m.vcpus[0]
    call(d, v, BIND, 40)
    sdei.interrupt(40, True)
    ready(d, v, 1000)
    ready(d, v, SHARED)
    call(d, v, UNMASK)
    m.lines.gic_lines.clear()
    d.reset()
    assert not sdei.interrupt(40, True)  # the line is the vGIC's again (the machine lowers it)
    assert sdei.masked(0)
    assert call(d, v, STATUS, SHARED) == 0 and call(d, v, STATUS, 1000) == s.INVALID_PARAMETERS


def test_trace_shows_dispatch_and_complete() -> None:
    m, d, _ = setup()
    v = m.vcpus[0]
    lines: list[str] = []
    d.trace = lambda r: lines.append(format_record(r))
    in_handler(d, v)
    call(d, v, COMPLETE, 0)
    assert any("SDEI_EVENT_SIGNAL(event=0x0, target_pe=0x80000000) = 0x0 SUCCESS" in line for line in lines)
    assert f"[vcpu0 sdei] --- dispatch event 0 -> handler {HANDLER:#x} (arg {ARG:#x}, interrupted pc " \
           f"{PC:#x} pstate {PSTATE:#x}) ---" in lines
    assert f"[vcpu0 sdei] --- complete event 0: back to pc {PC:#x} ---" in lines
    assert format_record(TraceEvent(1, "sdei", "x")) == "[vcpu1 sdei] --- x ---"


def test_event_declarations() -> None:
    assert parse_event("100") == EventSpec(100)
    assert parse_event("0x20, shared, critical") == EventSpec(0x20, True, True)
    for bad in ("x", "5,loud"):
        with pytest.raises(VmmError):
            parse_event(bad)
    m = machine(1, all_on=True)
    for events, match in (([EventSpec(0)], "0 is the software"), ([EventSpec(1000)], "bound-interrupt"),
                          ([EventSpec(5), EventSpec(5, shared=True)], "twice"), ([EventSpec(1 << 31)], "not in")):
        with pytest.raises(VmmError, match=match):
            Sdei(m.context(), events)


CALLS = st.tuples(st.integers(0, 1), st.integers(F, F + 0x13),
                  st.lists(st.sampled_from([0, 1, 2, 3, CRITICAL, SHARED, 1000, 40, 27, HANDLER, HANDLER + 1,
                                            0x8000_0000, 0x8000_0001, U64, 1 << 32]), min_size=5, max_size=5))
ACTIONS = st.one_of(CALLS, st.tuples(st.just("settle"), st.integers(0, 1)),
                    st.tuples(st.just("trigger"), st.sampled_from([0, CRITICAL, SHARED])),
                    st.tuples(st.just("line"), st.booleans()))
# (cpu, function ID, x1..x5) or one of the three other actions ACTIONS draws
Action = (tuple[int, int, list[int]] | tuple[Literal["settle"], int] | tuple[Literal["trigger"], int]
          | tuple[Literal["line"], bool])


@settings(max_examples=300, deadline=None)
@given(st.lists(ACTIONS, max_size=60))
def test_random_calls_keep_the_state_machine_valid(actions: list[Action]) -> None:
    """Any sequence of calls, triggers and dispatches: no exception, only states of table 6-1,
    at most a normal and a critical handler nested per PE, and every COMPLETE pops one."""
    m, d, sdei = setup()
    for a in actions:
        if a[0] == "settle":
            m.vcpus[a[1]].settle()
        elif a[0] == "trigger":
            if a[1] == SHARED:
                sdei.trigger(SHARED)
            else:
                sdei.trigger(a[1], cpu=0)
        elif a[0] == "line":
            sdei.interrupt(40, a[1])
        else:
            cpu, fid, args = a
            v = m.vcpus[cpu]
            frames = len(sdei.pes[cpu].frames)
            result = call(d, v, fid, *args)
            if fid in (COMPLETE, RESUME):
                assert (result is None) == (frames > 0)
                assert len(sdei.pes[cpu].frames) == max(0, frames - 1)
        for pe in sdei.pes:
            assert len(pe.frames) <= 2
            if len(pe.frames) == 2:
                assert not pe.frames[0].reg.spec.critical and pe.frames[1].reg.spec.critical
            for reg in (*pe.private.values(), *sdei.shared.values()):
                assert reg.state in s.TRANSITIONS

"""The SMCCC dispatcher against a fake vCPU: routing, results, truncation, register writes."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvm_bindings.constants import SmcccFilterAction
from pyvmm import cli
from pyvmm.errors import SmcccFilterUnavailableError, VmmError
from pyvmm.machine.vm import Vm
from pyvmm.services.psci import KvmPsci
from pyvmm.smccc.call import SmcccCall
from pyvmm.smccc.context import TraceEvent
from pyvmm.smccc.dispatcher import Dispatcher, HandlerError, TraceRecord
from pyvmm.smccc.service import NO_RESULT, Results
from tests import fuzzing
from tests.unit.fakes import FakeVcpu

U64 = 0xFFFF_FFFF_FFFF_FFFF
SIP64 = 0xC200_0000
SIP32 = 0x8200_0000


def test_single_result_is_one_register_write() -> None:
    d, v = Dispatcher(), FakeVcpu()
    d.register(SIP64, 16, lambda call: 7)
    d.dispatch(v, SIP64 + 3, 0)
    assert v.writes == [(0, 7)]
    assert v.reads == []  # arguments are read only on demand


def test_four_results_skip_registers_already_holding_the_value() -> None:
    d, v = Dispatcher(), FakeVcpu(regs={1: 10, 2: 20, 3: 30})

    def handler(call: SmcccCall) -> Results:
        x1, x2, x3 = call.args(3)
        return (0, x1, x2 + 1, x3)

    d.register(SIP64, 1, handler)
    d.dispatch(v, SIP64, 0)
    assert v.writes == [(0, 0), (2, 21)]


def test_a_vcpus_calls_share_one_object_and_each_reads_its_own_arguments() -> None:
    """The dispatcher fills in each vCPU's one SmcccCall again for its next call: the arguments
    read by the last call must not leak into the next, nor one vCPU's call into another's."""
    d = Dispatcher()
    v0, v1 = FakeVcpu(0, regs={1: 5}), FakeVcpu(1, regs={1: 9})
    seen: list[tuple[SmcccCall, int, int, int]] = []

    def handler(call: SmcccCall) -> Results:
        seen.append((call, call.vcpu.index, call.function_id, call.arg(1)))
        return 0

    d.register(SIP64, 2, handler)
    d.dispatch(v0, SIP64, 0)
    v0.x[1] = 6
    d.dispatch(v0, SIP64 + 1, 0)
    d.dispatch(v1, SIP64, 0)
    assert [s[1:] for s in seen] == [(0, SIP64, 5), (0, SIP64 + 1, 6), (1, SIP64, 9)]
    assert seen[0][0] is seen[1][0] and seen[2][0] is not seen[0][0]


def test_smc32_results_and_arguments_are_32_bit() -> None:
    d, v = Dispatcher(), FakeVcpu(regs={1: 0xAAAA_BBBB_CCCC_DDDD})
    seen = []

    def handler(call: SmcccCall) -> Results:
        seen.append(call.arg(1))
        return (-1, 0xFFFF_FFFF)

    d.register(SIP32, 1, handler)
    d.dispatch(v, SIP32, 0)
    assert seen == [0xCCCC_DDDD]
    assert v.writes == [(0, 0xFFFF_FFFF), (1, 0xFFFF_FFFF)]
    d.register(SIP32 + 1, 1, lambda call: 0x1_0000_0002)  # w0 cannot hold it: the handler's mistake
    with pytest.raises(HandlerError, match=r"returned 4294967298, beyond 32 bits \(an SMC32 call\)"):
        d.dispatch(v, SIP32 + 1, 0)


def test_smc64_negative_result_is_sign_extended() -> None:
    d, v = Dispatcher(), FakeVcpu()
    d.register(SIP64, 1, lambda call: -2)
    d.dispatch(v, SIP64, 0)
    assert v.writes == [(0, U64 - 1)]


def test_unrouted_id_gets_not_supported() -> None:
    d, v = Dispatcher(), FakeVcpu()
    d.dispatch(v, 0xC300_0000, 0)
    assert v.writes == [(0, U64)]
    d.dispatch(v, 0x8300_0000, 0)
    assert v.writes[-1] == (0, 0xFFFF_FFFF)


@pytest.mark.parametrize(("conduit", "flags", "other"), [("hvc", 0, 1), ("smc", 1, 0)])
def test_only_the_vms_conduit_is_served(conduit: str, flags: int, other: int) -> None:
    d, v = Dispatcher(conduit), FakeVcpu()
    calls: list[tuple[str, str]] = []

    def handler(call: SmcccCall) -> int:
        calls.append((call.conduit, repr(call)))
        return 0

    d.register(SIP64, 1, handler)
    d.dispatch(v, SIP64, flags)
    d.dispatch(v, SIP64, other)
    assert calls == [(conduit, f"SmcccCall(0xc2000000 via {conduit} on vcpu0)")]
    assert v.writes == [(0, 0), (0, U64)]  # the other conduit: NOT_SUPPORTED


def test_unknown_conduit_is_refused() -> None:
    with pytest.raises(VmmError, match="'hvc' or 'smc'"):
        Dispatcher("svc")


def answer(d: Dispatcher, fid: int) -> Results | None:
    """What the handler routed for `fid` returns (None: no route)."""
    fn = d.resolve(fid)
    return None if fn is None else fn.handler(SmcccCall(FakeVcpu(), fid))


def test_route_boundaries() -> None:
    d = Dispatcher()
    d.register(0xC600_0010, 0x10, lambda call: 1, "b")
    d.register(0xC600_0000, 0x10, lambda call: 2, "a")
    assert [answer(d, fid) for fid in (0xC600_0000, 0xC600_000F, 0xC600_0010)] == [2, 2, 1]
    fn = d.resolve(0xC600_001F)
    assert fn is not None and fn.name == "b[0xf]"
    assert d.resolve(0xC600_0020) is None
    assert d.resolve(0xC5FF_FFFF) is None


def test_overlapping_or_bad_routes_are_refused() -> None:
    d = Dispatcher()
    d.register(SIP64, 0x10, lambda call: 0, "first")
    with pytest.raises(VmmError, match=r"overlaps 0xc2000000\+16 \(first\)"):
        d.register(SIP64 + 0xF, 2, lambda call: 0, "second")
    with pytest.raises(VmmError, match="32-bit"):
        d.register(0xFFFF_FFFF, 2, lambda call: 0)


def test_bad_result_counts_and_raising_handlers() -> None:
    d, v = Dispatcher(), FakeVcpu()
    d.register(SIP64, 1, lambda call: (1, 2, 3, 4, 5))
    with pytest.raises(HandlerError, match="1 to 4 results"):
        d.dispatch(v, SIP64, 0)
    d.register(SIP64 + 1, 1, lambda call: 1 // 0)
    with pytest.raises(HandlerError, match="0xc2000001 raised ZeroDivisionError"):
        d.dispatch(v, SIP64 + 1, 0)


def test_filter_ranges_come_from_routes_and_denials() -> None:
    d = Dispatcher()
    d.register(SIP64, 0x10, lambda call: 0, "sip")
    d.deny(0xC300_0000, 0x100, "oem")
    ranges = d.filter_ranges()
    assert [(r.base, r.size, r.action) for r in ranges] == [
        (SIP64, 0x10, SmcccFilterAction.FWD_TO_USER), (0xC300_0000, 0x100, SmcccFilterAction.DENY)]


def test_lookup_cache_is_bounded() -> None:
    d, v = Dispatcher(), FakeVcpu()
    for fid in range(5_000):
        d.dispatch(v, 0xC700_0000 + fid, 0)
    assert len(d._cache) <= 4096


def test_replace_and_deny_carve_only_their_ids() -> None:
    d = Dispatcher()
    d.register(0x8400_0000, 0x20, lambda call: 1, "psci32")
    d.replace(0x8400_0000, 1, lambda call: 2, "mine")
    d.deny(0x8400_0010, 2, "gone")
    ranges = [(r.base, r.size, r.action.name, r.name) for r in d.filter_ranges()]
    assert ranges == [(0x8400_0000, 1, "FWD_TO_USER", "mine"), (0x8400_0001, 0xF, "FWD_TO_USER", "psci32"),
                      (0x8400_0010, 2, "DENY", "gone"), (0x8400_0012, 0xE, "FWD_TO_USER", "psci32")]
    assert answer(d, 0x8400_0000) == 2
    assert d.resolve(0x8400_0011) is None
    assert answer(d, 0x8400_001F) == 1
    d.replace(0x8400_0011, 1, lambda call: 3, "back")  # replacing part of a denied range
    assert [(r.base, r.size) for r in d.filter_ranges()][2:4] == [(0x8400_0010, 1), (0x8400_0011, 1)]


def test_registration_ends_once_the_filter_is_installed() -> None:
    d = Dispatcher()
    d.register(SIP64, 1, lambda call: 0, "early")
    d.freeze()
    with pytest.raises(VmmError, match="the SMCCC filter is fixed once the VM runs"):
        d.register(SIP32, 1, lambda call: 0, "late")
    with pytest.raises(VmmError, match="the SMCCC filter is fixed once the VM runs"):
        d.replace(SIP64, 1, lambda call: 1)
    with pytest.raises(VmmError, match="the SMCCC filter is fixed once the VM runs"):
        d.deny(0xC300_0000, 1)
    assert [r.name for r in d.filter_ranges()] == ["early"]


def returns_nothing(call: SmcccCall) -> Any:  # what a user's module may do
    pass


@pytest.mark.parametrize(("result", "problem"), [
    (None, "returned None"), ("7", "returned '7'"), (1.5, "returned 1.5"), ((), "returned ()"),
    ((1, 2, 3, 4, 5), "returned 5 results"), ([1, "a"], "returned [1, 'a'], not integers"),
    (1 << 64, "beyond 64 bits"), (-(1 << 63) - 1, "beyond 64 bits"), ((0, 1 << 70), "beyond 64 bits"),
])
def test_a_bad_result_is_the_handlers_error_naming_it(result: object, problem: str) -> None:
    d, v = Dispatcher(), FakeVcpu()

    def my_handler(call: SmcccCall) -> Any:  # what a user's handler may do
        return result

    d.register(SIP64, 1, my_handler, "mine")
    with pytest.raises(HandlerError) as caught:
        d.dispatch(v, SIP64, 0)
    message = str(caught.value)
    assert message.startswith("SMCCC handler test_a_bad_result_is_the_handlers_error_naming_it.<locals>.my_handler() "
                              "in test_dispatcher.py for 0xc2000000 ")
    assert problem in message and "1 to 4 results" in message
    assert v.writes == []  # nothing half-written


def test_a_module_handler_that_returns_nothing_is_named() -> None:
    d, v = Dispatcher(), FakeVcpu()
    d.register(SIP64, 1, returns_nothing, "mine")
    d.trace = lambda record: None  # the traced path checks the same way
    with pytest.raises(HandlerError, match=r"handler returns_nothing\(\) in test_dispatcher.py for 0xc2000000 returned None"):
        d.dispatch(v, SIP64, 0)


def test_extreme_results_in_range_are_written() -> None:
    d, v = Dispatcher(), FakeVcpu()
    d.register(SIP64, 1, lambda call: (-(1 << 63), U64, True, 0), "edges")
    d.dispatch(v, SIP64, 0)
    assert v.writes == [(0, 1 << 63), (1, U64), (2, 1), (3, 0)]


def test_aarch32_callers_get_not_supported_for_every_smc64_call() -> None:
    """SMCCC 1.3 §5.2: no SMC64/HVC64 function for an AArch32 caller, registered or not; the
    filter forwards the whole SMC64 half past KVM's reserved range so KVM's own (TRNG_RND64)
    are covered too, and every SMC32 route stays as it was."""
    d, v = Dispatcher(), FakeVcpu()
    d.register(SIP64, 16, lambda call: 7, "sip64")
    d.register(SIP32, 16, lambda call: 8, "sip32")
    d.deny(0xC500_0000, 16, "denied")
    d.aarch32_callers = True
    d.dispatch(v, SIP64 + 1, 0)
    d.dispatch(v, SIP32 + 1, 0)
    assert v.writes == [(0, U64), (0, 8)]
    ranges = d.filter_ranges()
    assert [(r.base, r.size, r.action) for r in ranges if r.base >= 0xC000_0000] == [
        (0xC001_0000, 0x3FFF_0000, SmcccFilterAction.FWD_TO_USER)]
    assert (SIP32, 16, SmcccFilterAction.FWD_TO_USER) in [(r.base, r.size, r.action) for r in ranges]
    traced: list[TraceRecord | TraceEvent] = []
    d.trace = traced.append
    d.dispatch(v, SIP64 + 2, 0)
    assert isinstance(traced[0], TraceRecord) and traced[0].note == "an SMC64 call from AArch32"


anything = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=20) | st.just(NO_RESULT) | st.just(object()),
    lambda kids: st.lists(kids, max_size=6) | st.tuples(kids, kids) | st.dictionaries(st.text(max_size=4), kids, max_size=3)
    | st.frozensets(st.integers() | st.text(max_size=4), max_size=4),
    max_leaves=12)


@pytest.mark.fuzz
@settings(max_examples=fuzzing.size(300, 20_000), deadline=None, database=None)
@given(result=anything, smc64=st.booleans())
def test_whatever_a_handler_returns_the_answer_or_the_error_is_well_formed(result: object, smc64: bool) -> None:
    """Handlers are user code: their results are either written (truncated to the convention's
    width) or refused with one line naming the handler and the call; nothing else escapes."""
    d, v = Dispatcher(), FakeVcpu()
    base = SIP64 if smc64 else SIP32
    def garbage(call: SmcccCall) -> Any:
        return result

    d.register(base, 1, garbage, "garbage")
    try:
        d.dispatch(v, base, 0)
    except HandlerError as e:
        assert "\n" not in str(e) and f"{base:#010x}" in str(e)
    else:
        mask = U64 if smc64 else 0xFFFF_FFFF
        assert all(0 <= value <= mask for _, value in v.writes)
    fuzzing.tally("SMCCC handler results").add("returned objects")


def test_a_handler_that_raises_is_named() -> None:
    d, v = Dispatcher(), FakeVcpu()

    def explodes(call: SmcccCall) -> int:
        raise RuntimeError("first line\nsecond line")

    d.register(SIP64, 1, explodes, "explodes")
    with pytest.raises(HandlerError, match=r"SMCCC handler \S*explodes\(\) in test_dispatcher.py for 0xc2000000 raised "
                                           "RuntimeError: first line"):
        d.dispatch(v, SIP64, 0)
    assert cli.one_line("pyvmm: guest ended: error: first line\nsecond line") == \
        "pyvmm: guest ended: error: first line\\nsecond line"


def test_without_the_smccc_filter_what_needs_a_forwarded_call_is_refused_in_one_line() -> None:
    d = Dispatcher()
    d.filter_missing = True  # a host whose KVM forwards nothing (Linux < 6.4)
    release = os.uname().release

    def catch(vcpu: object, function_id: int, flags: int) -> None:
        pass

    attempts: list[tuple[Callable[[], object], str]] = [
        (lambda: d.register(SIP64, 16, lambda call: 0, "mine"), "the SMCCC service mine"),
        (lambda: d.deny(SIP64, 16), "denying SMCCC calls"),
        (lambda: d.replace(SIP64, 16, lambda call: 0, "v2"), "replacing SMCCC calls with v2"),
        (lambda: setattr(d, "trace", print), "tracing SMCCC calls"),
        (lambda: setattr(d, "watch", catch), "catching SMCCC calls")]
    for attempt, what in attempts:
        with pytest.raises(SmcccFilterUnavailableError) as e:
            attempt()
        assert str(e.value) == (f"{what} needs KVM's SMCCC filter, which Linux >= 6.4 has; this host runs {release} "
                                "(guests run there with KVM's in-kernel PSCI)")
    assert d.services == [] and d.filter_ranges() == [] and d.trace is None and d.watch is None
    d.trace = None  # turning nothing off is fine
    d.add_service(KvmPsci("hvc"))  # KVM's PSCI needs no forwarding: only its device-tree node
    assert [s.name for s in d.services] == ["KVM PSCI"]


def test_cli_service_options_name_themselves_when_the_host_has_no_filter(tmp_path: Path) -> None:
    module = tmp_path / "svc.py"
    module.write_text("RANGE = (0xC2000000, 16)\n\ndef handle(call):\n    return 0\n")
    args = cli.build_parser().parse_args(["run", "--service", str(module), "--trace", "smccc", "-k", "x"])

    class NoFilterVm:
        has_smccc_filter = False
        smccc = Dispatcher()

    with pytest.raises(SmcccFilterUnavailableError, match=r"^--service and --trace smccc needs KVM's SMCCC filter, "
                       r"which Linux >= 6\.4 has"):
        cli.SmcccOptions(args).apply(cast(Vm, NoFilterVm()))

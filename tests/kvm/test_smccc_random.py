"""Random SMCCC calls from a real guest over both conduits (hypothesis draws the generator seeds):
pyvmm neither crashes nor hangs nor loses a thread, and every forwarded call gets an answer the
specifications allow (SMCCC 1.4, PSCI 1.1, SDEI 1.1). `make test` makes a share of the calls,
`make fuzz` the campaign (tests/fuzzing.py)."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.smccc.context import TraceEvent
from pyvmm.smccc.dispatcher import TraceRecord
from pyvmm.smccc.service import PYVMM_UID
from pyvmm.testing.payloads import MakePayloadVm
from tests import fuzzing
from tests.kvm.conftest import SIP64, guest, needs_filter

pytestmark = needs_filter("it tests forwarded SMCCC calls")

CALLS = fuzzing.size(2500, 12_500)  # per VM
VMS = fuzzing.size(1, 8)  # per conduit: the campaign makes 100,000 calls over each
UID_WORDS = tuple(int.from_bytes(PYVMM_UID[i:i + 4], "little") for i in range(0, 16, 4))
U64, U32 = (1 << 64) - 1, (1 << 32) - 1
SDEI_ERRORS = {0, -1, -2, -3, -5, -10}  # SDEI 1.1 §5.1: SUCCESS and the error codes
SDEI_QUERIES = {"SDEI_EVENT_STATUS", "SDEI_EVENT_GET_INFO", "SDEI_FEATURES", "SDEI_PE_MASK", "SDEI_INTERRUPT_BIND"}


def conformance_problem(r: TraceRecord) -> str | None:
    """Why the answer to one forwarded call breaks SMCCC 1.4 / PSCI 1.1 / SDEI 1.1, or None."""
    width = U64 if r.function_id & (1 << 30) else U32
    name = r.function.name if r.function else None
    if r.results is None:
        return None if name == "SYSTEM_OFF" else f"{name} did not return"
    if any(v > width for v in r.results):
        return "a result wider than the calling convention"
    x0 = r.results[0]
    signed = x0 - (width + 1) if x0 > width >> 1 else x0
    expected: dict[str | None, set[int] | None] = {
        None: {-1},
        "PSCI_VERSION": {0x1_0001},
        "AFFINITY_INFO": {0, 1, 2, -2},
        "MIGRATE_INFO_TYPE": {2},
        "PSCI_FEATURES": {0, -1},
        "CALL_COUNT": None, "REVISION": {1},
    }
    if name == "CALL_UID":
        return None if r.results == UID_WORDS else "a Call UID that is not pyvmm's"
    if name is not None and name.startswith("sip"):
        return None if r.results == (r.function_id & 0xFF,) else "the SiP handler's answer was lost"
    if name == "REPORT":  # the plugin's report service (pyvmm/testing/reports.py)
        return None
    if name == "SDEI_VERSION":
        return None if (x0 >> 48, x0 >> 32 & 0xFFFF) == (1, 1) else f"SDEI_VERSION answered {x0:#x}"
    if name is not None and name.startswith("SDEI_"):
        ok = signed in SDEI_ERRORS or (name in SDEI_QUERIES and signed >= 0)
        return None if ok else f"{name} answered {signed}"
    allowed = expected.get(name, set())
    if allowed is not None and signed not in allowed:
        return f"{name} answered {signed}"
    return None


@pytest.mark.fuzz
@pytest.mark.parametrize("conduit", ["hvc", "smc"])
def test_random_calls_get_conformant_answers(payload_vm: MakePayloadVm, conduit: str) -> None:
    t = fuzzing.tally(f"SMCCC calls from a guest over {conduit.upper()}")
    threads_before = threading.active_count()

    @settings(max_examples=VMS, deadline=None, database=None)
    @given(seed=st.integers(1, U64))
    def one_vm(seed: int) -> None:
        problems: list[tuple[str, str]] = []
        answered: set[str | None] = set()

        def check(r: TraceRecord | TraceEvent) -> None:
            if isinstance(r, TraceRecord):
                answered.add(r.function.name if r.function else None)
                t.add("reached pyvmm")
                if (p := conformance_problem(r)) is not None:
                    problems.append((hex(r.function_id), p))

        run = payload_vm(guest("smccc_random"), cpus=2, conduit=conduit)
        with run.vm as vm:  # closed after each example, not only after the test
            vm.enable_sdei()
            vm.smccc.register(SIP64, 0xF0, lambda call: call.function_id & 0xFF, "sip")
            vm.smccc.trace = check
            vm.vcpus[0].set_x(9, CALLS)
            vm.vcpus[0].set_x(10, seed)
            result = run.run(900).result
            assert (result.reason, result.message) == ("poweroff", "PSCI SYSTEM_OFF"), result
            assert all(v.thread is None or not v.thread.is_alive() for v in vm.vcpus)
        tag, calls, clobbered, *_ = run.values[-1]
        assert (tag, calls, clobbered) == (1, CALLS, 0)  # all made, x4..x17 preserved across every one
        assert problems == []
        assert {None, "PSCI_VERSION", "AFFINITY_INFO", "CALL_UID", "SDEI_VERSION"} <= answered
        assert any(n is not None and n.startswith("sip[") for n in answered)
        t.add("calls", CALLS)

    one_vm()
    assert threading.active_count() == threads_before  # every vCPU and device thread ended
    if fuzzing.CAMPAIGN:
        assert t.counts["calls"] >= 100_000

"""Thousands of pseudo-random SMCCC calls from a guest: pyvmm neither crashes nor hangs, and
every forwarded call gets an answer the specifications allow."""

from __future__ import annotations

from pyvmm.smccc.context import TraceEvent
from pyvmm.smccc.dispatcher import TraceRecord
from pyvmm.smccc.service import PYVMM_UID
from tests.kvm.conftest import FN_REPORT, SIP64, MakeVm, Reports

CALLS = 3000
UID_WORDS = tuple(int.from_bytes(PYVMM_UID[i:i + 4], "little") for i in range(0, 16, 4))
U64, U32 = (1 << 64) - 1, (1 << 32) - 1


def conformance_problem(r: TraceRecord) -> str | None:
    """Why the answer to one forwarded call breaks SMCCC 1.4 / PSCI 1.1, or None."""
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
    if name is not None and name.startswith("report"):
        return None
    allowed = expected.get(name, set())
    if allowed is not None and signed not in allowed:
        return f"{name} answered {signed}"
    return None


def test_random_calls_get_conformant_answers(make_vm: MakeVm) -> None:
    vm = make_vm("smccc_random", cpus=2)
    reports = Reports()
    vm.smccc.register(FN_REPORT, 1, reports, "report")
    vm.smccc.register(SIP64, 0xF0, lambda call: call.function_id & 0xFF, "sip")
    traced: list[TraceRecord | TraceEvent] = []
    vm.smccc.trace = traced.append
    vm.vcpus[0].set_x(9, CALLS)
    vm.vcpus[0].set_x(10, 0x9E37_79B9_7F4A_7C15)  # generator seed
    result = vm.run(timeout=600)
    assert (result.reason, result.message) == ("poweroff", "PSCI SYSTEM_OFF"), result

    records = [r for r in traced if isinstance(r, TraceRecord)]
    tag, calls, clobbered, *_ = reports.values[-1]
    assert (tag, calls, clobbered) == (1, CALLS, 0)  # all made, x4..x17 preserved across every one
    problems = [(hex(r.function_id), p) for r in records if (p := conformance_problem(r))]
    assert problems == []
    names = {r.function.name if r.function else None for r in records}
    assert len(records) > CALLS // 3  # a good share of the calls reached pyvmm
    assert {None, "PSCI_VERSION", "AFFINITY_INFO", "PSCI_FEATURES", "CALL_UID"} <= names
    assert any(n is not None and n.startswith("sip[") for n in names)

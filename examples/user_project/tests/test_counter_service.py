"""The counter service (counter_service.py) as its guest (guests/counter.S) sees it, on a fresh
VM per run: what the guest got back (its reports) and what it asked (the SMCCC trace)."""

from __future__ import annotations

import pytest

from pyvmm.pytest_plugin import FN_REPORT, Payloads, RunPayload

SERVICE = "counter_service.py"  # paths are relative to the project (pytest's rootdir)
GUEST = "guests/counter.S"
VERSION, ADD, READ, TOTAL, UNKNOWN = 0xC300_0000, 0xC300_0001, 0xC300_0002, 0xC300_0003, 0xC300_000F
HVC, SMC = 0xD400_0002, 0xD400_0003  # `hvc #0`, `smc #0`


def s64(value: int) -> int:
    """A register as a signed number (SMCCC error codes are negative)."""
    return value - (1 << 64) if value >> 63 else value


@pytest.mark.parametrize("conduit", ["hvc", "smc"])
def test_each_function_answers_as_specified(run_payload: RunPayload, conduit: str) -> None:
    run = run_payload(GUEST, services=[SERVICE], conduit=conduit)
    assert run.reason == "poweroff", run.result
    assert [v[0] for v in run.tagged(1)] == [0x1_0000]  # VERSION 1.0
    assert [v[:2] for v in run.tagged(2)] == [(0, 5), (0, 12)]  # ADD(5), ADD(7)
    assert [v[:2] for v in run.tagged(3)] == [(0, 12)]  # READ(vCPU 0)
    assert [s64(v[0]) for v in run.tagged(4)] == [-2]  # READ(99): INVALID_PARAMETERS
    assert [s64(v[0]) for v in run.tagged(5)] == [-1]  # NOT_SUPPORTED
    assert [v[:2] for v in run.tagged(7)] == [(0, 12)]  # TOTAL
    assert all(r.vcpu == 0 for r in run.reports)

    # the same calls, as the trace has them: over the conduit the payload was built for
    adds = run.trace.calls_to(ADD)
    assert [(c.vcpu, c.conduit, c.arg(1), c.results) for c in adds] == [(0, conduit, 5, (0, 5)), (0, conduit, 7, (0, 12))]
    assert [c.status for c in run.trace.calls_to(READ)] == [0, -2]
    assert run.trace.calls_to(UNKNOWN)[0].status == -1
    assert [c.at for c in run.trace.calls] == sorted(c.at for c in run.trace.calls)
    assert run.trace.names()[-1] == "SYSTEM_OFF" and run.trace.calls[-1].results is None  # it does not return
    assert len(run.trace.calls_to(FN_REPORT)) == len(run.reports) == 8


@pytest.mark.parametrize(("cpus", "cpu_on", "total"), [(1, -2, 12), (2, 0, 112)])
def test_each_vcpu_counts_for_itself(run_payload: RunPayload, cpus: int, cpu_on: int, total: int) -> None:
    run = run_payload(GUEST, services=[SERVICE], cpus=cpus)
    assert run.reason == "poweroff", run.result
    call, = run.trace.calls_to("CPU_ON")
    assert (call.vcpu, call.arg("target_cpu"), call.status) == (0, 1, cpu_on)
    assert [s64(v[0]) for v in run.tagged(6)] == [cpu_on]
    secondary = [(r.vcpu, r.values[1:3]) for r in run.reports if r.tag == 8]
    assert secondary == ([(1, (0, 100))] if cpus == 2 else [])  # vCPU 1's own count
    assert [v[:2] for v in run.tagged(7)] == [(0, total)]
    assert {c.vcpu for c in run.trace.calls_to(ADD)} == set(range(cpus))


@pytest.mark.pyvmm_timeout(2)
def test_a_guest_that_never_powers_off_ends_at_the_time_limit(run_payload: RunPayload) -> None:
    run = run_payload(bytes.fromhex("00000014"), services=[SERVICE])  # `b .`, as bytes
    assert run.reason == "timeout", run.result
    assert run.result.elapsed >= 2
    assert run.trace.calls == [] and run.reports == []


def test_the_guest_is_built_for_each_conduit(pyvmm_payloads: Payloads) -> None:
    """Needs no KVM: the plugin's payload cache, as the tests above use it."""
    words = {conduit: pyvmm_payloads.build(GUEST, conduit=conduit).read_bytes() for conduit in ("hvc", "smc")}
    assert HVC.to_bytes(4, "little") in words["hvc"] and SMC.to_bytes(4, "little") not in words["hvc"]
    assert SMC.to_bytes(4, "little") in words["smc"] and HVC.to_bytes(4, "little") not in words["smc"]

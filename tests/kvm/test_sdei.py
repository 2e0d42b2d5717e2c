"""SDEI 1.1 serviced by pyvmm on real KVM: assembled guests register handlers, pyvmm enters
them by rewriting vCPU registers, and COMPLETE / COMPLETE_AND_RESUME bring them back."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pyvmm.services.sdei import EventSpec, Sdei
from pyvmm.testing.payloads import MakePayloadVm, Payloads
from pyvmm.testing.reports import Report
from tests.kvm.conftest import guest, needs_filter, s64

pytestmark = needs_filter("it tests pyvmm's SDEI, served in Python")

SUCCESS, NOT_SUPPORTED, INVALID_PARAMETERS, DENIED, PENDING, OUT_OF_RESOURCE = 0, -1, -2, -3, -5, -10
CONDUITS = ["hvc", "smc"]
EVENTS = (EventSpec(100, critical=True), EventSpec(101), EventSpec(200, shared=True))
FILL = [0xA5A5_0000_0000_0000 | n << 32 | n for n in range(18)]  # fill_x4_x17's values
DAIF, EL1, EL1H_DAIF = 0x3C0, 1 << 2, 0x3C5


class RaiseOnCue:
    """The host's part, on the guest's reports: raise critical event 100 from inside the normal
    handler (tag 10) and event 101 from another thread while the guest spins (tag 13)."""

    def __init__(self, sdei: Sdei) -> None:
        self.sdei = sdei
        self.raised: list[bool] = []

    def __call__(self, report: Report) -> None:
        tag = report.tag
        if tag == 10:
            self.raised.append(self.sdei.trigger(100, cpu=0))
        elif tag == 13:
            def later() -> None:
                time.sleep(0.2)  # the guest is spinning in its loop by then
                self.raised.append(self.sdei.trigger(101, cpu=0))
            threading.Thread(target=later, daemon=True).start()


@pytest.mark.parametrize("conduit", CONDUITS)
def test_sdei_calls_dispatch_and_completion(payload_vm: MakePayloadVm, conduit: str) -> None:
    run = payload_vm(guest("sdei_basic"), conduit=conduit)
    vm = run.vm
    assert vm.serial.spi == 0  # the guest binds INTID 32
    sdei = vm.enable_sdei(EVENTS)
    host = RaiseOnCue(sdei)
    run.on_report(host)
    result = run.run(120).result
    assert (result.reason, result.message) == ("poweroff", "PSCI SYSTEM_OFF"), result
    assert not run.tagged(0xBAD)
    t = {tag: tuple(s64(v) for v in run.tagged(tag)[0]) for tag in range(1, 18) if tag not in (10, 13)}

    assert t[1][:3] == (1 << 48 | 1 << 32, 16 << 16, 0)  # SDEI 1.1; 16 shared bind slots; no relative mode
    assert t[2] == (INVALID_PARAMETERS, INVALID_PARAMETERS, DENIED, DENIED, DENIED)
    assert t[3] == (INVALID_PARAMETERS, INVALID_PARAMETERS, OUT_OF_RESOURCE, INVALID_PARAMETERS, DENIED)
    assert t[4] == (INVALID_PARAMETERS,) * 5

    # the handler: x0 = event, x1 = argument, x2 = interrupted PC (where SIGNAL returns), x3 = PSTATE
    event, arg, pc, pstate, signal_return = t[5]
    assert (event, arg, pc) == (0, 0xA4A4, signal_return)
    assert pstate & 0x3CF == EL1H_DAIF  # the guest runs at EL1h with DAIF masked from boot
    daif, current_el, spsel, ctx0, ctx4 = t[6]
    assert (daif, current_el, spsel) == (DAIF, EL1, 1)  # entered at EL1h, D, A, I, F masked
    assert (ctx0, ctx4 & (1 << 64) - 1) == (0, FILL[4])  # EVENT_CONTEXT: SIGNAL's result, x4
    ctx17, status_in_handler, clobbered, x0_after, status_after = t[7][:5]
    assert ctx17 & (1 << 64) - 1 == FILL[17]
    assert status_in_handler == 0b111  # registered, enabled, running
    assert clobbered == 0  # COMPLETE restored x4-x17 exactly (the handler used x9-x12)
    assert (x0_after, status_after) == (0, 0b011)

    elr, spsr, daif, current_el, signal_return_b = t[8]
    assert (elr, spsr & 0x3CF, daif, current_el) == (signal_return_b, EL1H_DAIF, DAIF, EL1)

    unregister, mask1, ran_masked, mask2, ran_unmasked = t[9]
    assert (unregister, mask1, ran_masked, mask2, ran_unmasked) == (SUCCESS, 1, 0, 0, 1)

    assert host.raised[:1] == [True]
    crit_event, crit_pc, in_normal, status0, status100 = t[11]
    assert (crit_event, crit_pc, status0, status100) == (100, in_normal, 0b111, 0b111)
    crit_first, unregister_running, status_pending, status_final = t[12][:4]
    assert (crit_first, unregister_running, status_pending, status_final) == (1, PENDING, 0b100, 0)

    assert host.raised[1:] == [True]
    host_event, host_pc, host_pstate, spin_start, spin_end = t[14]
    assert host_event == 101 and spin_start <= host_pc < spin_end
    assert host_pstate & DAIF == DAIF  # delivered although the guest had every interrupt masked

    bound, register, handled, unregister, release = t[15]
    assert (bound, register, handled, unregister, release) == (1000, SUCCESS, 1, SUCCESS, SUCCESS)
    bound_x0, bound_pc, after_ier = t[16][:3]
    assert (bound_x0, bound_pc) == (1000, after_ier)

    assert t[17] == (DENIED, DENIED, 0, SUCCESS, SUCCESS)
    assert sdei.dispatches == 7  # A, B, C, normal + critical, host-raised, bound interrupt


@pytest.mark.parametrize("conduit", CONDUITS)
def test_sdei_signal_to_another_pe_and_shared_routing(payload_vm: MakePayloadVm, conduit: str) -> None:
    run = payload_vm(guest("sdei_smp"), cpus=2, conduit=conduit)
    vm = run.vm
    sdei = vm.enable_sdei([EventSpec(200, shared=True)])
    raised: list[bool] = []

    def raise_on_cue(report: Report) -> None:
        if report.tag == 2:
            raised.append(sdei.trigger(200))

    run.on_report(raise_on_cue)
    result = run.run(120).result
    assert (result.reason, result.message) == ("poweroff", "PSCI SYSTEM_OFF"), result
    (event, mpidr, signalled, *_), = run.tagged(1)
    assert (event, mpidr, signalled) == (0, vm.vcpus[1].mpidr, SUCCESS)
    assert [s64(r[0]) for r in run.tagged(2)] == [SUCCESS] and raised == [True]
    (event, mpidr, *_), = run.tagged(3)
    assert (event, mpidr) == (200, vm.vcpus[1].mpidr)  # routed to cpu1, although cpu0 was unmasked


def test_cli_control_socket_and_trace(pyvmm_payloads: Payloads, tmp_path: Path) -> None:
    """`pyvmm run --sdei --control` runs sdei_basic, which at one point spins with interrupts
    masked until event 101 arrives; a second process raises it with `pyvmm sdei signal` once
    `pyvmm sdei status` shows the guest has registered and enabled it."""
    sock = str(tmp_path / "vm.sock")
    binary = pyvmm_payloads.build(guest("sdei_basic"))
    run = subprocess.Popen([sys.executable, "-m", "pyvmm", "run", "-f", str(binary),
                            "-m", "16", "--sdei", "--sdei-event", "100,critical", "--sdei-event", "101",
                            "--sdei-event", "200,shared", "--control", sock, "--trace", "smccc",
                            "--timeout", "120"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def pyvmm(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pyvmm", *args], capture_output=True, text=True, timeout=60)

    try:
        deadline = time.monotonic() + 90
        while True:
            assert time.monotonic() < deadline and run.poll() is None, "event 101 never became ready"
            status = pyvmm("sdei", "status", "--control", sock)
            if "event 101    vcpu0   normal   registered+enabled" in status.stdout:
                break
            time.sleep(0.2)
        assert "PEs: vcpu0 unmasked" in status.stdout
        p = pyvmm("sdei", "signal", "--control", sock, "101", "--cpu", "0")
        assert (p.returncode, p.stderr) == (0, "")
        out, err = run.communicate(timeout=120)
        assert run.returncode == 0, err
    finally:
        run.kill()
    assert "SDEI_EVENT_SIGNAL(event=0x0, target_pe=0x80000000) = 0x0 SUCCESS" in err
    assert "[vcpu0 sdei] --- dispatch event 101 -> handler" in err
    assert "[vcpu0 sdei] --- complete event 101: back to pc" in err
    assert "--- complete event 0: resume at" in err
    assert "SDEI_INTERRUPT_BIND(interrupt_number=0x20) = 0x3e8" in err
    p = pyvmm("sdei", "status", "--control", sock)
    assert p.returncode == 1 and "no VM listens" in p.stderr  # the socket went with the VM

"""pyvmm's pytest plugin: fixtures that run guests on arm64 KVM for firmware-interface tests.

Installed with pyvmm (entry point `pytest11`: `pyvmm`), or loaded with `-p pyvmm.pytest_plugin`.

Fixtures:
  run_payload     run a guest payload (a `.S` source, assembled for you, or a flat binary) on a
                  fresh VM with the SMCCC services, conduit and vCPU count you choose; returns a
                  PayloadRun: the exit (RunResult), what the guest reported, the SMCCC trace
  payload_vm      the same payload on its VM, loaded but not started: set the VM up (services,
                  registers, threads of your own), then .run() it
  linux           a Linux guest on the host's root, booted once per module (pyvmm_linux_scope)
                  and shared; linux.run(command) -> Completed(status, stdout, stderr)
  make_linux      a Linux guest of your own (kernel, vCPUs, services, ...), closed after the test
  pyvmm_payloads  the payload cache: assemble a `.S` file without running it (no KVM needed)

A test that uses run_payload, payload_vm, linux or make_linux (or is marked pyvmm_kvm) needs arm64 KVM
(and, for services, reports and the trace, its SMCCC filter: Linux >= 6.4). Where there is
none it FAILS, with one line saying why; with --pyvmm-skip-without-kvm it is skipped instead,
and the summary says how many were.

Every guest run has a time limit: pyvmm_timeout seconds (ini, default 60) for each payload run
and each command, pyvmm_boot_timeout (default 180) for a Linux boot; @pytest.mark.pyvmm_timeout(S)
sets a test's, and each call takes timeout=.

Guests report values by the convention pyvmm's own test guests follow: an SMC64 call FN_REPORT
(0xC20000F0) with x1..x6, x1 a tag; `.include "pyvmm.inc"` (pyvmm/testing/include/) has the
macros, and pyvmm32.inc those for AArch32 payloads (FN_REPORT32, 0x820000F0, with r1..r6).

This module imports nothing of pyvmm's machinery and touches no KVM until a fixture is used:
loading it must never break a pytest run, on any host.
"""

from pyvmm.testing.fixtures import (
    _pyvmm_linux_shared,
    linux,
    make_linux,
    payload_vm,
    pyvmm_payloads,
    run_payload,
)
from pyvmm.testing.hooks import (
    kvm_problem,
    pytest_addoption,
    pytest_configure,
    pytest_runtest_call,
)
from pyvmm.testing.linux import LinuxGuest, MakeLinux
from pyvmm.testing.payloads import MakePayloadVm, PayloadRun, Payloads, RunPayload
from pyvmm.testing.reports import FN_REPORT, FN_REPORT32, REPORT_ARGS, Report, add_services, report_service
from pyvmm.testing.trace import SmcccTrace, TracedCall, TracedEvent

__all__ = ["FN_REPORT", "FN_REPORT32", "REPORT_ARGS", "LinuxGuest", "MakeLinux", "MakePayloadVm", "PayloadRun",
           "Payloads", "Report", "RunPayload",
           "SmcccTrace", "TracedCall", "TracedEvent", "_pyvmm_linux_shared", "add_services", "kvm_problem", "linux",
           "make_linux", "payload_vm", "pytest_addoption", "pytest_configure", "pytest_runtest_call",
           "pyvmm_payloads", "report_service", "run_payload"]

"""`make demo`: an assembled guest makes SMCCC calls that pyvmm answers in Python.

The guest runs twice: on a VM whose conduit is HVC, then on one whose conduit is SMC. It calls
the vendor service of examples/vendor_service.py and does PSCI work (PSCI 1.1 is serviced by
pyvmm). Every forwarded call is traced, strace-style; the guest's own view follows each step.
"""

from __future__ import annotations

import sys
from pathlib import Path

import vendor_service

from pyvmm import SmcccCall, Vm, VmmError
from pyvmm.smccc.dispatcher import TraceRecord
from pyvmm.smccc.trace import TracePrinter
from pyvmm.testing.payload import PayloadCache
from pyvmm.testing.reports import FN_REPORT

ROOT = Path(__file__).resolve().parents[1]
PAYLOADS = PayloadCache(ROOT / "build" / "pyvmm-payloads")  # `make payloads` assembles the guest there
STEPS = ["DEMO_VERSION", "DEMO_ADD(40, 2)", "DEMO_SWAP(0x1111, 0x2222, 0x3333)", "unknown function 0xc6000042",
         "DEMO_VERSION on the other conduit", "PSCI_VERSION", "CPU_ON(cpu1), AFFINITY_INFO(cpu1) once off",
         "cpu1: DEMO_ADD(context ID 7, 35), MPIDR"]
VALUES_SHOWN = {2: 4, 6: 2, 7: 2}


def run(conduit: str) -> bool:
    print(f"\n== a 2-vCPU guest on a VM whose SMCCC conduit is {conduit.upper()} ==")
    binary, _ = PAYLOADS.build(ROOT / "examples" / "guests" / "smccc_demo.S", conduit=conduit)
    vm = Vm(cpus=2, mem_mib=16, conduit=conduit)
    with vm:
        vm.set_boot(vm.load_file(binary))
        base, count = vendor_service.RANGE
        vm.smccc.register(base, count, vendor_service.handle, vendor_service.NAME)

        def guest_saw(call: SmcccCall) -> int:
            step = call.arg(1)
            values = call.args(1 + VALUES_SHOWN.get(step, 1))[1:]
            print(f"   guest saw: {STEPS[step]:<44} -> {', '.join(f'{v:#x}' for v in values)}")
            return 0

        vm.smccc.register(FN_REPORT, 1, guest_saw, "report")
        trace = TracePrinter(sys.stdout)
        vm.smccc.trace = lambda record: (None if isinstance(record, TraceRecord) and record.function_id == FN_REPORT
                                         else trace(record))
        result = vm.run(timeout=60)
    print(f"== guest ended: {result}, {vm.smccc.calls} forwarded calls in {result.elapsed:.2f} s ==")
    return result.ok


def main() -> int:
    try:
        ok = all([run("hvc"), run("smc")])
    except VmmError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""`make demo`, SDEI part: a guest receives SDEI events that pyvmm delivers in Python.

The guest signals SDEI event 0 to itself, then spins with every interrupt masked; a host thread
raises platform event 100 with `vm.sdei.trigger()`, which is what `pyvmm sdei signal` does
through a running VM's control socket. The trace shows each SDEI call and each dispatch and
completion; the guest's own view follows each step.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

from pyvmm import SmcccCall, Vm, VmmError
from pyvmm.services.sdei import EventSpec
from pyvmm.smccc.trace import TracePrinter
from pyvmm.testing.payload import PayloadCache
from pyvmm.testing.reports import FN_REPORT

ROOT = Path(__file__).resolve().parents[1]
PAYLOADS = PayloadCache(ROOT / "build" / "pyvmm-payloads")  # `make payloads` assembles the guest there
STEPS = {0: ("SDEI_VERSION", 1), 1: ("in the handler: event, argument, interrupted PC", 3),
         2: ("EVENT_SIGNAL returned, after the handler ran", 1), 3: ("spinning, interrupts masked", 0),
         4: ("event 100 got through; powering off", 0)}


def main() -> int:
    print("\n== SDEI: events delivered to a guest by pyvmm, in Python ==", flush=True)
    try:
        binary, _ = PAYLOADS.build(ROOT / "examples" / "guests" / "sdei_demo.S")
        with Vm(cpus=1, mem_mib=16) as vm:
            vm.set_boot(vm.load_file(binary))
            sdei = vm.enable_sdei([EventSpec(100)])

            def raise_event_100() -> None:
                time.sleep(0.3)
                print("   host: raising SDEI event 100 on vcpu0", flush=True)
                sdei.trigger(100, cpu=0)

            def guest_saw(call: SmcccCall) -> int:
                step = call.arg(1)
                text, shown = STEPS.get(step, ("?", 0))
                values = call.args(1 + shown)[1:]
                print(f"   guest saw: {text:<48} {', '.join(f'{v:#x}' for v in values)}", flush=True)
                if step == 3:
                    threading.Thread(target=raise_event_100, daemon=True).start()
                return 0

            vm.smccc.register(FN_REPORT, 1, guest_saw, "report")
            printer = TracePrinter(sys.stdout)  # every SDEI call, dispatch and completion; not the reports
            vm.smccc.trace = lambda r: None if getattr(r, "function_id", 0) == FN_REPORT else printer(r)
            result = vm.run(timeout=120)
    except VmmError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 1
    print(f"== guest ended: {result}; {sdei.dispatches} SDEI events delivered ==")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""`make demo`: a guest makes SMCCC calls over HVC and SMC; a Python service answers them.

The service is a toy vendor-hypervisor interface (owner 6, SMC64 IDs 0xC6000000..0xC60000FF):
pyvmm asks KVM's SMCCC filter to forward that range, and the handler below answers each call.
Run it on an arm64 host with /dev/kvm (`make demo` arranges that on any host).
"""

from __future__ import annotations

import sys
from pathlib import Path

from pyvmm import SmcccCall, Vm, VmmError

DEMO = 0xC600_0000
GUEST = Path(__file__).resolve().parents[1] / "build" / "guests" / "smccc_demo.bin"
STEPS = ["DEMO_VERSION over HVC", "DEMO_ADD(40, 2) over HVC", "DEMO_SWAP over SMC (four results)",
         "unknown function 0xc6000042 over SMC", "PSCI_VERSION (KVM in-kernel, not forwarded)"]
NAMES = {0: "DEMO_VERSION", 1: "DEMO_ADD", 2: "DEMO_SWAP"}


def demo_service(call: SmcccCall) -> int | tuple[int, ...]:
    """Answer the vendor-hypervisor demo calls; anything unknown gets NOT_SUPPORTED (-1)."""
    number = call.function_id & 0xFFFF
    if number == 0xF0:  # the guest reporting what it saw
        step, values = call.arg(6), call.args(4)
        shown = ", ".join(f"{v:#x}" for v in (values if step == 2 else values[:1]))
        print(f"  guest saw   {STEPS[step]:<44} -> {shown}")
        return 0
    if number == 0:
        results: int | tuple[int, ...] = (1 << 16) | 0  # version 1.0
    elif number == 1:
        results = call.arg(1) + call.arg(2)
    elif number == 2:
        x1, x2, x3 = call.args(3)
        results = (0, x3, x2, x1)
    else:
        results = -1
    shown = results if isinstance(results, tuple) else (results,)
    print(f"  vcpu{call.vcpu.index} {call.conduit}  {call.function_id:#010x} "
          f"{NAMES.get(number, 'unknown'):<12} -> {', '.join(f'{v & (2**64 - 1):#x}' for v in shown)}")
    return results


def main() -> int:
    try:
        vm = Vm(cpus=1, mem_mib=16)
    except VmmError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 1
    with vm:
        vm.set_boot(vm.load_file(GUEST))
        vm.smccc.register(DEMO, 0x100, demo_service, "vendor hypervisor demo service")
        print("pyvmm demo: SMCCC filter forwards 0xc6000000-0xc60000ff to a Python service")
        result = vm.run(timeout=60)
    print(f"pyvmm demo: guest ended: {result} after {result.elapsed:.2f} s, "
          f"{vm.smccc.calls} forwarded calls answered")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())

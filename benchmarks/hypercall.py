"""Forwarded SMCCC round trip through pyvmm's real exit path, against two baselines in one run.

The guest (tests/guests/hvc_loop.S) calls PSCI_VERSION in a loop and times it with CNTVCT_EL0.
  in-kernel     no filter: KVM's own PSCI answers without leaving the kernel;
  native floor  the call forwarded by the SMCCC filter and answered by native code doing only
                KVM_RUN + KVM_SET_ONE_REG(x0) (benchmarks/native_floor.S): the least any
                userspace VMM pays, whatever its language;
  pyvmm         forwarded and answered by pyvmm's vCPU loop, dispatcher and a Python handler.
Rounds interleave the three on fresh VMs, so drift on a shared machine hits them alike; the
figures are medians, the ratios medians of the per-round ratios.
"""

from __future__ import annotations

from benchmarks.common import NativeFloor, median, run_hvc_loop
from pyvmm.vm import Vm

PSCI_VERSION = 0x8400_0000
PSCI_1_1 = 0x0001_0001
CALLS = 1500
ROUNDS = 5


def forward_psci_version(vm: Vm) -> None:
    vm.smccc.register(PSCI_VERSION, 1, lambda call: PSCI_1_1, "PSCI_VERSION (bench)")


def main() -> dict[str, float]:
    floor = NativeFloor()
    kernel, native, pyvmm = [], [], []
    for _ in range(ROUNDS):
        kernel.append(run_hvc_loop(PSCI_VERSION, CALLS).us_per_call)
        native.append(run_hvc_loop(PSCI_VERSION, CALLS, forward_psci_version,
                                   lambda vm: floor.forward(vm, CALLS, PSCI_1_1)).us_per_call)
        r = run_hvc_loop(PSCI_VERSION, CALLS, forward_psci_version)
        assert r.last_x0 == PSCI_1_1, hex(r.last_x0)
        pyvmm.append(r.us_per_call)
    vs_floor = median([p / n for p, n in zip(pyvmm, native, strict=True)])
    vs_kernel = median([p / k for p, k in zip(pyvmm, kernel, strict=True)])
    print(f"hypercall round trip: PSCI_VERSION over HVC, {ROUNDS} rounds x {CALLS} calls (median)")
    print(f"  in-kernel (no filter)                        {median(kernel):7.1f} us/call")
    print(f"  native floor (KVM_RUN + 1 SET_ONE_REG)       {median(native):7.1f} us/call")
    print(f"  pyvmm (filter -> vCPU loop -> Python)        {median(pyvmm):7.1f} us/call")
    print(f"  pyvmm / native floor                         {vs_floor:7.2f}x")
    print(f"  pyvmm / in-kernel                            {vs_kernel:7.2f}x")
    print("  ioctls per forwarded call: KVM_RUN + KVM_SET_ONE_REG(x0)")
    return {"kernel_us": median(kernel), "native_us": median(native), "pyvmm_us": median(pyvmm),
            "pyvmm_vs_native": vs_floor}


if __name__ == "__main__":
    main()

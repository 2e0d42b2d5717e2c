"""Forwarded SMCCC round trips through pyvmm's real exit path, against baselines in the same run.

The guest (tests/guests/hvc_loop.S) makes one call in a loop and times it with CNTVCT_EL0:
  in-kernel     KVM's own PSCI answers, without leaving the kernel (no filter on PSCI);
  native floor  PSCI_VERSION forwarded by the SMCCC filter and answered by native code doing
                only KVM_RUN + KVM_SET_ONE_REG(x0) (benchmarks/native_floor.S): the least any
                userspace VMM pays, whatever its language;
  pyvmm         pyvmm's PSCI 1.1 service: vCPU loop, dispatcher, handler (AFFINITY_INFO also
                reads its two arguments with KVM_GET_ONE_REG).
Rounds interleave the variants on fresh VMs, so drift on a shared machine hits them alike; the
figures are medians, the ratios medians of per-round ratios.
"""

from __future__ import annotations

from benchmarks.common import NativeFloor, median, run_hvc_loop
from pyvmm.vm import Vm

PSCI_VERSION = 0x8400_0000
AFFINITY_INFO64 = 0xC400_0004
PSCI_1_1 = 0x0001_0001
CALLS = 1500
ROUNDS = 5


def forward_psci_version_only(vm: Vm) -> None:
    vm.smccc.register(PSCI_VERSION, 1, lambda call: PSCI_1_1, "PSCI_VERSION (native floor)")


def main() -> dict[str, float]:
    floor = NativeFloor()
    rows: dict[str, dict[str, list[float]]] = {
        "PSCI_VERSION": {"kernel": [], "native": [], "pyvmm": []},
        "AFFINITY_INFO": {"kernel": [], "pyvmm": []},
    }
    for _ in range(ROUNDS):
        v = rows["PSCI_VERSION"]
        v["kernel"].append(run_hvc_loop(PSCI_VERSION, CALLS, psci=False).us_per_call)
        v["native"].append(run_hvc_loop(PSCI_VERSION, CALLS, forward_psci_version_only,
                                        lambda vm: floor.forward(vm, CALLS, PSCI_1_1), psci=False).us_per_call)
        res = run_hvc_loop(PSCI_VERSION, CALLS)
        assert res.last_x0 == PSCI_1_1, hex(res.last_x0)
        v["pyvmm"].append(res.us_per_call)
        a = rows["AFFINITY_INFO"]
        a["kernel"].append(run_hvc_loop(AFFINITY_INFO64, CALLS, psci=False).us_per_call)
        res = run_hvc_loop(AFFINITY_INFO64, CALLS)
        assert res.last_x0 == 0, hex(res.last_x0)  # vCPU 0 is ON
        a["pyvmm"].append(res.us_per_call)

    print(f"SMCCC round trips over HVC, {ROUNDS} rounds x {CALLS} calls (median us per call)")
    print(f"  {'call':<15}{'in-kernel':>10}{'native floor':>14}{'pyvmm':>9}{'pyvmm/floor':>13}{'pyvmm/kernel':>14}")
    out: dict[str, float] = {}
    for name, r in rows.items():
        kernel, mine = median(r["kernel"]), median(r["pyvmm"])
        vs_kernel = median([p / k for p, k in zip(r["pyvmm"], r["kernel"], strict=True)])
        if "native" in r:
            native = f"{median(r['native']):14.1f}"
            vs_floor = f"{median([p / n for p, n in zip(r['pyvmm'], r['native'], strict=True)]):12.2f}x"
        else:
            native, vs_floor = f"{'-':>14}", f"{'-':>13}"
        print(f"  {name:<15}{kernel:10.1f}{native}{mine:9.1f}{vs_floor}{vs_kernel:13.2f}x")
        out[f"{name}_pyvmm_us"] = mine
    print("  ioctls per forwarded call: KVM_RUN + KVM_SET_ONE_REG(x0) (+ one KVM_GET_ONE_REG per argument read)")
    return out


if __name__ == "__main__":
    main()

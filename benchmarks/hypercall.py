"""Forwarded SMCCC round trips through pyvmm's real exit path, against baselines in the same run.

The guest (tests/guests/hvc_loop.S, and its SMC build) makes one call in a loop and times it with
CNTVCT_EL0:
  in-kernel     KVM's own PSCI answers, without leaving the kernel (no filter on PSCI);
  native floor  PSCI_VERSION forwarded by the SMCCC filter and answered by native code doing
                only KVM_RUN + KVM_SET_ONE_REG(x0) (benchmarks/native_floor.S): the least any
                userspace VMM pays, whatever its language; it stands in for kvmtool's userspace
                PSCI (`lkvm run --psci`), which makes those same two ioctls and more;
  pyvmm         pyvmm's PSCI 1.1 service: vCPU loop, dispatcher, handler (AFFINITY_INFO also
                reads its two arguments with KVM_GET_ONE_REG).
Rounds interleave the variants on fresh VMs, so drift on a shared machine hits them alike; the
figures are medians, the ratios medians of per-round ratios. Target: pyvmm <= 1.0x the floor.
"""

from __future__ import annotations

from benchmarks.common import CallbackLoop, NativeFloor, median, run_hvc_loop
from pyvmm.machine.vm import Vm

PSCI_VERSION = 0x8400_0000
AFFINITY_INFO64 = 0xC400_0004
PSCI_1_1 = 0x0001_0001
CALLS = 1500
ROUNDS = 5


def forward_psci_version_only(vm: Vm) -> None:
    vm.smccc.register(PSCI_VERSION, 1, lambda call: PSCI_1_1, "PSCI_VERSION (native floor)")


def python_floor(vm: Vm) -> None:
    """Answer the next CALLS forwarded calls on vCPU 0 with PSCI 1.1 from a bare Python loop."""
    fd = vm.vcpus[0].fd
    run, write_x0 = fd.run, fd.write_x0
    fd.x0_value[0] = PSCI_1_1
    for _ in range(CALLS):
        if run() < 0 or write_x0() < 0:
            raise SystemExit("the Python floor loop failed")


def native_floor_us(conduit: str = "hvc") -> float:
    """One forwarded PSCI_VERSION round trip at the native floor (median of ROUNDS)."""
    floor = NativeFloor()
    return median([run_hvc_loop(PSCI_VERSION, CALLS, forward_psci_version_only,
                                lambda vm: floor.forward(vm, CALLS, PSCI_1_1), psci=False,
                                conduit=conduit).us_per_call for _ in range(ROUNDS)])


def expect(x0: int, wanted: int, what: str) -> None:
    if x0 != wanted:
        raise SystemExit(f"SMCCC benchmark: {what} answered {x0:#x}, not {wanted:#x}")


def main() -> dict[str, float]:
    floor, callback = NativeFloor(), CallbackLoop()

    def answer(function_id: int) -> int:
        return PSCI_1_1 if function_id == PSCI_VERSION else 0xFFFF_FFFF

    rows: dict[str, dict[str, list[float]]] = {
        "PSCI_VERSION": {"kernel": [], "native": [], "python": [], "callback": [], "pyvmm": []},
        "  over SMC": {"kernel": [], "native": [], "python": [], "callback": [], "pyvmm": []},
        "AFFINITY_INFO": {"kernel": [], "pyvmm": []},
    }
    for _ in range(ROUNDS):
        for name, conduit in (("PSCI_VERSION", "hvc"), ("  over SMC", "smc")):
            v = rows[name]
            v["kernel"].append(run_hvc_loop(PSCI_VERSION, CALLS, psci=False, conduit=conduit).us_per_call)
            v["native"].append(run_hvc_loop(PSCI_VERSION, CALLS, forward_psci_version_only,
                                            lambda vm: floor.forward(vm, CALLS, PSCI_1_1), psci=False,
                                            conduit=conduit).us_per_call)
            v["python"].append(run_hvc_loop(PSCI_VERSION, CALLS, forward_psci_version_only, python_floor, psci=False,
                                            conduit=conduit).us_per_call)
            v["callback"].append(run_hvc_loop(PSCI_VERSION, CALLS, forward_psci_version_only,
                                              lambda vm: callback.forward(vm, CALLS, answer), psci=False,
                                              conduit=conduit).us_per_call)
            res = run_hvc_loop(PSCI_VERSION, CALLS, conduit=conduit)
            expect(res.last_x0, PSCI_1_1, f"PSCI_VERSION over {conduit}")
            v["pyvmm"].append(res.us_per_call)
        a = rows["AFFINITY_INFO"]
        a["kernel"].append(run_hvc_loop(AFFINITY_INFO64, CALLS, psci=False).us_per_call)
        res = run_hvc_loop(AFFINITY_INFO64, CALLS)
        expect(res.last_x0, 0, "AFFINITY_INFO of vCPU 0 (ON)")
        a["pyvmm"].append(res.us_per_call)

    print(f"SMCCC round trips over HVC (and SMC), {ROUNDS} rounds x {CALLS} calls (median us per call)")
    print(f"  {'call':<15}{'in-kernel':>10}{'native floor':>14}{'Python floor':>14}{'native+Python':>15}{'pyvmm':>9}"
          f"{'pyvmm/floor':>13}{'Python/floor':>14}{'native+Python/floor':>21}{'pyvmm/kernel':>14}")
    out: dict[str, float] = {}

    def ratio(a: str, b: str, r: dict[str, list[float]]) -> float:
        return median([x / y for x, y in zip(r[a], r[b], strict=True)])

    for name, r in rows.items():
        kernel, mine = median(r["kernel"]), median(r["pyvmm"])
        if "native" in r:
            floors = f"{median(r['native']):14.1f}{median(r['python']):14.1f}{median(r['callback']):15.1f}"
            vs = (f"{ratio('pyvmm', 'native', r):12.2f}x{ratio('python', 'native', r):13.2f}x"
                  f"{ratio('callback', 'native', r):20.2f}x")
        else:
            floors, vs = f"{'-':>14}{'-':>14}{'-':>15}", f"{'-':>13}{'-':>14}{'-':>21}"
        print(f"  {name:<15}{kernel:10.1f}{floors}{mine:9.1f}{vs}{ratio('pyvmm', 'kernel', r):13.2f}x")
    print("  ioctls per forwarded call: KVM_RUN + KVM_SET_ONE_REG(x0) (+ one KVM_GET_ONE_REG per argument read)")
    print("  target: pyvmm/floor <= 1.00x (the floor stands in for kvmtool's `lkvm run --psci`)")
    out["floor_us"] = median(rows["PSCI_VERSION"]["native"])
    out["PSCI_VERSION_pyvmm_us"] = median(rows["PSCI_VERSION"]["pyvmm"])
    return out


if __name__ == "__main__":
    main()

"""SDEI delivery through pyvmm's real exit path, against a plain forwarded call in the same run.

  signal round trip  tests/guests/sdei_loop.S: SDEI_EVENT_SIGNAL to its own PE, the handler is
                     entered and calls SDEI_EVENT_COMPLETE; timed in the guest by CNTVCT_EL0.
                     "dispatch + COMPLETE" is that minus one forwarded call (PSCI_VERSION).
  host -> handler    tests/guests/sdei_wait.S spins with interrupts masked; a host thread calls
                     Sdei.trigger() and the handler's first instructions make a call that the
                     host timestamps: kick, dispatch, guest entry and one exit, in wall time.
Rounds interleave the variants on fresh VMs; figures are medians.
"""

from __future__ import annotations

import threading
import time

from benchmarks.common import guest_binary, median, run_hvc_loop
from kvm_bindings.regs import CORE_REGS
from pyvmm.machine.vm import Vm
from pyvmm.services.sdei import EventSpec
from pyvmm.smccc.call import SmcccCall
from pyvmm.testing.reports import FN_REPORT

PSCI_VERSION = 0x8400_0000
ROUNDS = 5
SIGNALS = 300
HOST_SIGNALS = 40


def signal_round_trip(rounds: int) -> float:
    """us per SIGNAL + dispatch + COMPLETE (sdei_loop.S reports its handler entries as x0)."""
    r = run_hvc_loop(0, rounds, Vm.enable_sdei, guest="sdei_loop")
    if r.last_x0 != r.calls:
        raise SystemExit(f"SDEI benchmark: {r.last_x0} handler entries for {r.calls} signals")
    return r.us_per_call


def host_latencies(count: int) -> list[float]:
    """us from Sdei.trigger() on a host thread to the handler's first call reaching pyvmm."""
    vm = Vm(cpus=1, mem_mib=16)
    try:
        vm.set_boot(vm.load_file(guest_binary("sdei_wait")))
        sdei = vm.enable_sdei([EventSpec(101)])
        ready = threading.Semaphore(0)
        arrived = threading.Semaphore(0)
        stamps: list[float] = []

        def on_report(call: SmcccCall) -> int:
            if call.arg(1) == 1:
                ready.release()
            else:
                stamps.append(time.perf_counter())
                arrived.release()
            return 0

        vm.smccc.register(FN_REPORT, 1, on_report, "report")
        vm.vcpus[0].set_x(9, count)
        latencies: list[float] = []

        def host() -> None:
            for _ in range(count):
                if not ready.acquire(timeout=60):
                    return
                time.sleep(0.005)  # the guest is in its spin loop by now
                started = time.perf_counter()
                sdei.trigger(101, cpu=0)
                if not arrived.acquire(timeout=60):
                    return
                latencies.append((stamps[-1] - started) * 1e6)

        t = threading.Thread(target=host, daemon=True)
        t.start()
        result = vm.run(timeout=300)
        t.join(5)
        if result.reason != "poweroff" or len(latencies) != count:
            raise SystemExit(f"SDEI latency guest did not finish: {result}")
        return latencies
    finally:
        vm.close()


def one_reg_cost(count: int = 2000) -> float:
    """us per KVM_GET_ONE_REG from Python on a vCPU outside KVM_RUN: the unit of a dispatch."""
    vm = Vm(cpus=1, mem_mib=16)
    try:
        fd = vm.vcpus[0].fd
        ids = [CORE_REGS[f"x{n}"] for n in range(18)]
        started = time.perf_counter()
        for i in range(count):
            fd.get_one_reg(ids[i % 18])
        return (time.perf_counter() - started) / count * 1e6
    finally:
        vm.close()


def main() -> dict[str, float]:
    plain: list[float] = []
    trips: list[float] = []
    latency: list[float] = []
    for _ in range(ROUNDS):
        plain.append(run_hvc_loop(PSCI_VERSION, SIGNALS).us_per_call)
        trips.append(signal_round_trip(SIGNALS))
        latency.append(median(host_latencies(HOST_SIGNALS)))
    call, trip, host = median(plain), median(trips), median(latency)
    dispatch = median([t - p for t, p in zip(trips, plain, strict=True)])
    print(f"SDEI delivery, {ROUNDS} rounds (median us)")
    print(f"  forwarded call (PSCI_VERSION)        {call:9.1f}")
    print(f"  SIGNAL + dispatch + COMPLETE          {trip:9.1f}   {trip / call:5.2f}x a forwarded call")
    print(f"  dispatch + COMPLETE alone             {dispatch:9.1f}   {dispatch / call:5.2f}x")
    print(f"  host trigger -> handler's first call  {host:9.1f}   {host / call:5.2f}x")
    reg = one_reg_cost()
    print(f"  one KVM_GET_ONE_REG (guest not running)  {reg:6.1f}   a dispatch makes 27 register ioctls "
          "(save x0-x17, PC, PSTATE, read SCTLR_EL1; set x0-x3, PC, PSTATE),")
    print("  a COMPLETE 20 (restore x0-x17, PC, PSTATE): arm64 KVM has no KVM_GET_REGS/KVM_SET_REGS")
    return {"sdei_round_trip_us": trip, "sdei_dispatch_complete_us": dispatch, "sdei_host_latency_us": host}


if __name__ == "__main__":
    main()

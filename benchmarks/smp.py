"""Forwarded calls from several vCPUs at once: aggregate throughput against KVM's own PSCI.

tests/guests/smp_call_loop.S runs the same PSCI_VERSION loop on every vCPU at once (all start
together) and each vCPU times its own loop with the VM-wide virtual counter. Aggregate calls/s is
every vCPU's calls over the span from the first start to the last end. In-kernel: KVM's PSCI
answers (no filter on PSCI); pyvmm: its PSCI, one vCPU thread each. Scaling is calls/s at N vCPUs
over calls/s at 1: where a lock (or the GIL) serializes the vCPU threads it stays near 1.0x. The
host's own CPU count caps it (the emulated host has 2). To tell the GIL from a lock of pyvmm's,
the last column runs N one-vCPU VMs in N processes (no shared interpreter) released together:
their calls/s summed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

from benchmarks.common import FN_REPORT, GUESTS, median
from pyvmm.smccc.call import SmcccCall
from pyvmm.vm import Vm

PSCI_VERSION = 0x8400_0000
PSCI_1_1 = 0x0001_0001
CALLS = 600
ROUNDS = 3
VCPUS = (1, 2, 4)


class Loop:
    """A VM of `cpus` vCPUs set up to run smp_call_loop.S; run() gives its aggregate calls/s."""

    def __init__(self, cpus: int, psci: bool) -> None:
        self.cpus = cpus
        self.vm = Vm(cpus=cpus, mem_mib=16, psci=psci)
        self.reports: list[tuple[int, ...]] = []
        lock = threading.Lock()

        def on_report(call: SmcccCall) -> int:
            with lock:
                self.reports.append(call.args(6))
            return 0

        vm = self.vm
        vm.set_boot(vm.load_file(GUESTS / "smp_call_loop.bin"))
        vm.smccc.register(FN_REPORT, 1, on_report, "report")
        vm.vcpus[0].set_x(9, CALLS)
        vm.vcpus[0].set_x(10, PSCI_VERSION)
        vm.vcpus[0].set_x(15, cpus)

    def run(self) -> float:
        try:
            result = self.vm.run(timeout=300)
        finally:
            self.vm.close()
        reports = self.reports
        if result.reason != "poweroff" or sorted(r[0] for r in reports) != list(range(self.cpus)):
            raise SystemExit(f"SMP benchmark guest did not finish: {result}, reports {reports}")
        if any(r[4] != PSCI_1_1 for r in reports):
            raise SystemExit(f"SMP benchmark: a vCPU's PSCI_VERSION was wrong: {reports}")
        start, end, freq = min(r[1] for r in reports), max(r[2] for r in reports), reports[0][5]
        return sum(r[3] for r in reports) / ((end - start) / freq)


def calls_per_second(cpus: int, psci: bool) -> float:
    return Loop(cpus, psci).run()


def one_process() -> None:
    """In a child process: set up a one-vCPU loop, say so, run it when the parent says go."""
    loop = Loop(1, True)
    print("ready", flush=True)
    sys.stdin.readline()
    print(loop.run(), flush=True)


def separate_processes(n: int) -> float:
    """calls/s of n one-vCPU VMs in n processes, released at once, summed."""
    code = "from benchmarks.smp import one_process; one_process()"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(n)]
    try:
        for p in procs:
            assert p.stdout is not None
            if p.stdout.readline().strip() != "ready":
                raise SystemExit("SMP benchmark: a child process did not start")
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        rates = []
        for p in procs:
            out, _ = p.communicate(timeout=300)
            rates.append(float(out))
    finally:
        for p in procs:
            p.kill()
            p.wait()
    return sum(rates)


def main() -> dict[str, float]:
    runs: dict[tuple[int, bool], list[float]] = {(n, p): [] for n in VCPUS for p in (False, True)}
    apart: dict[int, list[float]] = {n: [] for n in VCPUS[1:]}
    for _ in range(ROUNDS):
        for key in runs:
            runs[key].append(calls_per_second(*key))
        for n in apart:
            apart[n].append(separate_processes(n))
    rate = {key: median(v) for key, v in runs.items()}
    print(f"\nSMP: PSCI_VERSION from every vCPU at once, {CALLS} calls each, {ROUNDS} rounds (median; host has "
          f"{os.cpu_count()} CPUs)")
    print(f"  {'vCPUs':<7}{'in-kernel calls/s':>18}{'scaling':>9}{'pyvmm calls/s':>15}{'scaling':>9}"
          f"{'pyvmm/kernel':>14}{'N processes':>13}{'scaling':>9}")
    one = rate[(1, True)]
    for n in VCPUS:
        k, p = rate[(n, False)], rate[(n, True)]
        sep = median(apart[n]) if n in apart else one
        print(f"  {n:<7}{k:18.0f}{k / rate[(1, False)]:8.2f}x{p:15.0f}{p / one:8.2f}x{p / k:13.2f}x"
              f"{sep:13.0f}{sep / one:8.2f}x")
    return {f"pyvmm_{n}": rate[(n, True)] for n in VCPUS}


if __name__ == "__main__":
    main()

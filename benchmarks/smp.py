"""Forwarded calls from several vCPUs at once: aggregate throughput against KVM's own PSCI.

tests/guests/smp_call_loop.S runs the same PSCI_VERSION loop on every vCPU at once (all start
together) and each vCPU times its own loop with the VM's virtual counter, then reports it. The
VMM notes the host's CLOCK_MONOTONIC as each report arrives, which places the VM's counter, and
so every loop, on one system-wide clock: loops in different VMs and processes are comparable.
Aggregate calls/s is every loop's calls over the span from the first start to the last end:
loops that did not overlap in time add nothing. In-kernel: KVM's PSCI answers (no filter on
PSCI). pyvmm: its PSCI, one vCPU thread each. Scaling is calls/s at N over calls/s at 1; the
host's CPU count caps it (the emulated host has 2). What serializes pyvmm's vCPUs, if anything,
shows in two more columns of N one-vCPU VMs released together:
  one process   N VMs, N vCPU threads, one interpreter: the GIL is shared, no pyvmm state is;
  N processes   one VM each: neither the GIL nor any pyvmm state is shared.
One VM scaling like one process, and N processes scaling better, puts it on the GIL; one VM
scaling worse than one process puts it on a lock of the VM's own.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
import time

from benchmarks.common import guest_binary, median
from pyvmm.machine.vm import Vm
from pyvmm.smccc.call import SmcccCall
from pyvmm.testing.reports import FN_REPORT

PSCI_VERSION = 0x8400_0000
PSCI_1_1 = 0x0001_0001
CALLS = 600
ROUNDS = 3
VCPUS = (1, 2, 4)
TIMEOUT_S = 300.0

Span = tuple[int, float, float]  # one vCPU's loop: calls, start and end on the host's CLOCK_MONOTONIC


class Loop:
    """A VM of `cpus` vCPUs set up to run smp_call_loop.S; run() gives each vCPU's span."""

    def __init__(self, cpus: int, psci: bool) -> None:
        self.cpus = cpus
        self.vm = Vm(cpus=cpus, mem_mib=16, psci=psci)
        self.reports: list[tuple[float, tuple[int, ...]]] = []
        lock = threading.Lock()

        def on_report(call: SmcccCall) -> int:
            arrived = time.monotonic()
            with lock:
                self.reports.append((arrived, call.args(6)))
            return 0

        vm = self.vm
        vm.set_boot(vm.load_file(guest_binary("smp_call_loop")))
        vm.smccc.register(FN_REPORT, 1, on_report, "report")
        vm.vcpus[0].set_x(9, CALLS)
        vm.vcpus[0].set_x(10, PSCI_VERSION)
        vm.vcpus[0].set_x(15, cpus)

    def run(self) -> list[Span]:
        try:
            result = self.vm.run(timeout=TIMEOUT_S)
        finally:
            self.vm.close()
        reports = [r for _, r in self.reports]
        if result.reason != "poweroff" or sorted(r[0] for r in reports) != list(range(self.cpus)):
            raise SystemExit(f"SMP benchmark guest did not finish: {result}, reports {reports}")
        if any(r[4] != PSCI_1_1 for r in reports):
            raise SystemExit(f"SMP benchmark: a vCPU's PSCI_VERSION was wrong: {reports}")
        # report = (index, counter at start, counter at end, calls, last x0, counter frequency).
        # The counter is the VM's own (one offset for all its vCPUs), so the loops keep their
        # exact places relative to each other; the least-delayed report puts the VM's counter
        # on the host's clock, to within one exit.
        freq = reports[0][5]
        offset = min(arrived - r[2] / freq for arrived, r in self.reports)
        return [(r[3], r[1] / freq + offset, r[2] / freq + offset) for r in reports]


def aggregate(spans: list[Span]) -> float:
    """Calls/s of loops that ran side by side: all their calls over the span they covered."""
    return sum(s[0] for s in spans) / (max(s[2] for s in spans) - min(s[1] for s in spans))


def one_vm(cpus: int, psci: bool) -> float:
    return aggregate(Loop(cpus, psci).run())


def vms_in_one_process(n: int) -> float:
    """n one-vCPU VMs of this process, run by n threads released at once."""
    loops = [Loop(1, True) for _ in range(n)]  # made here: the first VM needs the main thread
    spans: list[Span] = []
    failures: list[BaseException] = []

    def run(loop: Loop) -> None:
        try:
            spans.extend(loop.run())
        except BaseException as e:  # SystemExit from a check, or a VMM error: reported below
            failures.append(e)

    threads = [threading.Thread(target=run, args=(loop,)) for loop in loops]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise SystemExit(f"SMP benchmark: a VM in one process failed: {failures[0]}")
    return aggregate(spans)


def one_process() -> None:
    """In a child process: set up a one-vCPU loop, say so, run it when the parent says go,
    print its spans."""
    loop = Loop(1, True)
    print("ready", flush=True)
    sys.stdin.readline()
    print(json.dumps(loop.run()), flush=True)


def _first_line(p: subprocess.Popen[str], timeout: float) -> str:
    assert p.stdout is not None
    if not select.select([p.stdout], [], [], timeout)[0]:
        return ""
    return p.stdout.readline().strip()


def _failure(p: subprocess.Popen[str]) -> str:
    p.kill()
    _, err = p.communicate()
    lines = err.strip().splitlines()
    return lines[-1] if lines else f"exit status {p.returncode}"


def separate_processes(n: int) -> float:
    """n one-vCPU VMs in n processes, released at once."""
    code = "from benchmarks.smp import one_process; one_process()"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(n)]
    try:
        for p in procs:
            if _first_line(p, TIMEOUT_S) != "ready":
                raise SystemExit(f"SMP benchmark: a child process did not start: {_failure(p)}")
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        spans: list[Span] = []
        for p in procs:
            try:
                out, _ = p.communicate(timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                raise SystemExit(f"SMP benchmark: a child process ran for more than {TIMEOUT_S:g} s") from None
            if p.returncode != 0:
                raise SystemExit(f"SMP benchmark: a child process failed: {_failure(p)}")
            spans.extend(tuple(s) for s in json.loads(out))
    finally:
        for p in procs:
            p.kill()
            p.wait()
    return aggregate(spans)


def main() -> dict[str, float]:
    kinds = ("kernel", "pyvmm", "process", "processes")
    runs: dict[tuple[str, int], list[float]] = {(k, n): [] for n in VCPUS for k in kinds}
    for _ in range(ROUNDS):  # interleaved, so drift in the host's speed touches every column alike
        for n in VCPUS:
            runs[("kernel", n)].append(one_vm(n, False))
            runs[("pyvmm", n)].append(one_vm(n, True))
            runs[("process", n)].append(vms_in_one_process(n) if n > 1 else runs[("pyvmm", 1)][-1])
            runs[("processes", n)].append(separate_processes(n) if n > 1 else runs[("pyvmm", 1)][-1])
    rate = {key: median(v) for key, v in runs.items()}

    def scaling(kind: str, n: int) -> float:
        base = "kernel" if kind == "kernel" else "pyvmm"
        return median([a / b for a, b in zip(runs[(kind, n)], runs[(base, 1)], strict=True)])

    print(f"\nSMP: PSCI_VERSION from every vCPU at once, {CALLS} calls each, {ROUNDS} rounds (median; host has "
          f"{os.cpu_count()} CPUs); calls/s and scaling against 1 vCPU")
    print(f"  {'vCPUs':<7}{'in-kernel':>11}{'scaling':>9}{'pyvmm':>8}{'scaling':>9}{'pyvmm/kernel':>14}"
          f"{'VMs, 1 process':>16}{'scaling':>9}{'N processes':>13}{'scaling':>9}")
    for n in VCPUS:
        per_call = median([k / p for k, p in zip(runs[("kernel", n)], runs[("pyvmm", n)], strict=True)])
        print(f"  {n:<7}{rate[('kernel', n)]:11.0f}{scaling('kernel', n):8.2f}x{rate[('pyvmm', n)]:8.0f}"
              f"{scaling('pyvmm', n):8.2f}x{per_call:13.2f}x{rate[('process', n)]:16.0f}{scaling('process', n):8.2f}x"
              f"{rate[('processes', n)]:13.0f}{scaling('processes', n):8.2f}x")
    print("  pyvmm/kernel: time per call, as in the round-trip table; VMs, 1 process: N one-vCPU VMs sharing the"
          " GIL and nothing else; N processes: sharing nothing")
    return {f"pyvmm_{n}": rate[("pyvmm", n)] for n in VCPUS}


if __name__ == "__main__":
    main()

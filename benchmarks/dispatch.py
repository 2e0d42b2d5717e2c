"""The Python work of one forwarded SMCCC call, without KVM: pyvmm's exit path against the bare loop.

A fake vCPU fd (tests/unit/fakes.py) stands in for KVM: its KVM_RUN returns at once with a
prepared KVM_EXIT_HYPERCALL in kvm_run, and its register ioctls touch only a dict. It drives
  Python floor   hypercall.py's bare loop: run() then write_x0() (with KVM_GET_ONE_REG of x1 and
                 x2 in between for AFFINITY_INFO, which needs its two arguments);
  pyvmm          the real vCPU loop, SMCCC dispatcher and PSCI service.
What pyvmm spends above the floor here is its dispatch, which every forwarded call pays on a real
host too (there on top of the two ioctls' world switches). Times are the thread's CPU time, so a
busy machine's other work stays out of them. Runs anywhere: `python -m benchmarks.dispatch`.
"""

from __future__ import annotations

import time
from typing import Any, cast

from pyvmm.devices.bus import MmioBus
from pyvmm.kvm.fds import VcpuFd
from pyvmm.machine.exit_dispatch import MachineExits
from pyvmm.machine.vcpu import Vcpu
from pyvmm.services.psci import Psci
from pyvmm.smccc.context import ServiceContext
from pyvmm.smccc.dispatcher import Dispatcher
from tests.unit.fakes import FakeRam, FakeVcpuFd

PSCI_VERSION = 0x8400_0000
AFFINITY_INFO64 = 0xC400_0004
CALLS = 10_000
ROUNDS = 7


def pyvmm_path(function_id: int) -> tuple[FakeVcpuFd, Vcpu]:
    """One vCPU with the machine's exit handling and pyvmm's PSCI, on a fake fd."""
    smccc = Dispatcher()
    none = cast(Any, None)  # the MMIO policy and life cycle: no hypercall reaches them
    exits = MachineExits(smccc, MmioBus(), none, none)
    fd = FakeVcpuFd()
    fd.hypercall(function_id)  # over HVC, x1..x3 = 0: AFFINITY_INFO asks about vCPU 0, level 0
    vcpu = Vcpu(0, cast(VcpuFd, fd), 0, exits)
    smccc.add_service(Psci(ServiceContext([vcpu], FakeRam(), none, "hvc", smccc.emit, none)))
    smccc.freeze()
    return fd, vcpu


def time_pyvmm(fd: FakeVcpuFd, vcpu: Vcpu, calls: int) -> float:
    """ns per call through Vcpu's own exit loop (as its thread runs it between kicks)."""
    fd.arm(calls)
    vcpu.leave_guest()  # the final kick ends the loop
    started = time.thread_time_ns()
    vcpu._loop()  # the loop itself, without a thread around it
    return (time.thread_time_ns() - started) / calls


def time_floor(fd: FakeVcpuFd, calls: int, x0: int, reads: bool) -> float:
    """ns per call of hypercall.py's python_floor loop (plus the argument reads, if `reads`)."""
    fd.arm(calls)
    run, write_x0, get_x = fd.run, fd.write_x0, fd.get_x
    fd.x0_value[0] = x0
    started = time.thread_time_ns()
    if reads:
        for _ in range(calls):
            if run() < 0 or get_x(1) < 0 or get_x(2) < 0 or write_x0() < 0:
                raise SystemExit("the Python floor loop failed")
    else:
        for _ in range(calls):
            if run() < 0 or write_x0() < 0:
                raise SystemExit("the Python floor loop failed")
    return (time.thread_time_ns() - started) / calls


def main(calls: int = CALLS, rounds: int = ROUNDS) -> dict[str, float]:
    out: dict[str, float] = {}
    print(f"Python dispatch of a forwarded SMCCC call on a fake vCPU fd (no KVM), {rounds} rounds x {calls} calls "
          "(median ns of CPU time per call)")
    print(f"  {'call':<15}{'Python floor':>14}{'pyvmm':>9}{'above floor':>13}{'pyvmm/floor':>13}")
    for name, fid, expected, reads in (("PSCI_VERSION", PSCI_VERSION, 0x1_0001, False),
                                       ("AFFINITY_INFO", AFFINITY_INFO64, 0, True)):
        fd, vcpu = pyvmm_path(fid)
        floor, mine = [], []
        for _ in range(rounds):  # interleaved, so drift hits both alike
            floor.append(time_floor(fd, calls, expected, reads))
            fd.x0_value[0] = 0xDEAD
            mine.append(time_pyvmm(fd, vcpu, calls))
            if fd.x0_value[0] != expected:
                raise SystemExit(f"{name} answered {fd.x0_value[0]:#x}, not {expected:#x}")
        f, m = sorted(floor)[rounds // 2], sorted(mine)[rounds // 2]
        print(f"  {name:<15}{f:14.0f}{m:9.0f}{m - f:13.0f}{m / f:12.2f}x")
        out[f"{name}_floor_ns"], out[f"{name}_pyvmm_ns"] = f, m
    return out


if __name__ == "__main__":
    main()

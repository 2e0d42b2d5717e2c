"""Shared helpers for the benchmarks: timed guest loops and the native-code floor."""

from __future__ import annotations

import mmap
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from kvm_bindings import CData, ffi
from kvm_bindings.regs import CORE_REGS
from pyvmm.machine.vm import Vm
from pyvmm.smccc.call import SmcccCall
from pyvmm.testing.payload import PayloadCache
from pyvmm.testing.reports import FN_REPORT

ROOT = Path(__file__).resolve().parents[1]
PAYLOADS = PayloadCache(ROOT / "build" / "pyvmm-payloads")  # `make payloads` assembles them there


def guest_binary(name: str, conduit: str = "hvc") -> Path:
    """Test guest `name` (tests/guests/NAME.S), assembled for `conduit`."""
    return PAYLOADS.build(ROOT / "tests" / "guests" / f"{name}.S", conduit=conduit)[0]


def host_code(name: str) -> Path:
    """benchmarks/NAME.S: AArch64 code the benchmarks run on the host itself."""
    return PAYLOADS.build(ROOT / "benchmarks" / f"{name}.S")[0]


@dataclass
class LoopResult:
    calls: int
    seconds: float
    last_x0: int

    @property
    def us_per_call(self) -> float:
        return self.seconds / self.calls * 1e6


def run_hvc_loop(function_id: int, calls: int, setup: Callable[[Vm], object] | None = None,
                 before_run: Callable[[Vm], None] | None = None, psci: bool = True,
                 guest: str = "hvc_loop", conduit: str = "hvc") -> LoopResult:
    """Run hvc_loop.S: `calls` HVCs of `function_id` (x1..x3 = 0), timed in the guest by
    CNTVCT_EL0. `psci`: pyvmm's PSCI (else KVM's in-kernel PSCI answers PSCI calls). Another
    `guest` with the same contract (x9 rounds, report ticks, frequency, rounds, x0) may stand in.
    `conduit` "smc": the guest's SMC build (NAME_smc.bin) on a VM whose services answer SMC."""
    vm = Vm(cpus=1, mem_mib=16, psci=psci, conduit=conduit)
    try:
        vm.set_boot(vm.load_file(guest_binary(guest, conduit)))
        report: list[tuple[int, ...]] = []

        def on_report(call: SmcccCall) -> int:
            report.append(call.args(4))
            return 0

        vm.smccc.register(FN_REPORT, 1, on_report, "report")
        if setup is not None:
            setup(vm)
        vm.vcpus[0].set_x(9, calls)
        vm.vcpus[0].set_x(10, function_id)
        if before_run is not None:
            vm.install_smccc_filter()
            before_run(vm)
        result = vm.run(timeout=120)
        if result.reason != "poweroff" or not report:
            raise SystemExit(f"benchmark guest did not finish: {result}")
        ticks, freq, n, last_x0 = report[0]
        return LoopResult(n, ticks / freq, last_x0)
    finally:
        vm.close()


def map_code(path: Path) -> tuple[mmap.mmap, int]:
    """An assembled file mapped executable, and its address.

    Mapping the file (rather than copying code into anonymous memory) lets the kernel make the
    instruction cache coherent when the page is first mapped executable.
    """
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run `make bench`")
    with open(path, "rb") as f:
        code = mmap.mmap(f.fileno(), 0, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_EXEC)
    return code, int(ffi.cast("uintptr_t", ffi.from_buffer(code)))


def x0_reg(value: int = 0) -> tuple[CData, CData]:
    """A kvm_one_reg for x0 and the u64 it points at."""
    val = ffi.new("uint64_t *", value)
    return ffi.new("struct kvm_one_reg *", {"id": CORE_REGS["x0"], "addr": int(ffi.cast("uintptr_t", val))}), val


class NativeFloor:
    """benchmarks/native_floor.S called via cffi."""

    def __init__(self, path: Path | None = None) -> None:
        path = path or host_code("native_floor")
        self._map, addr = map_code(path)
        self._fn = ffi.cast("long (*)(long, long, struct kvm_one_reg *)", addr)

    def forward(self, vm: Vm, calls: int, x0_value: int) -> None:
        """Answer the next `calls` forwarded calls on vCPU 0 with x0 = x0_value, natively."""
        reg, _val = x0_reg(x0_value)
        ret = self._fn(vm.vcpus[0].fd.fd, calls, reg)
        if ret:
            raise SystemExit(f"native floor loop failed: errno {-ret}")


class CallbackLoop:
    """benchmarks/callback_loop.S called via cffi: native exit loop, Python answer per call."""

    def __init__(self, path: Path | None = None) -> None:
        path = path or host_code("callback_loop")
        if ffi.offsetof("struct kvm_run", "hypercall", "nr") != 32:
            raise SystemExit("callback_loop.S reads hypercall.nr at offset 32: not this kvm_run's layout")
        self._map, addr = map_code(path)
        self._fn = ffi.cast("long (*)(long, long, struct kvm_one_reg *, void *, struct kvm_run *)", addr)

    def forward(self, vm: Vm, calls: int, answer: Callable[[int], int]) -> None:
        """Answer the next `calls` forwarded calls on vCPU 0 with x0 = answer(function ID)."""
        callback = ffi.callback("uint64_t(uint64_t)", answer)
        reg, _val = x0_reg()
        fd = vm.vcpus[0].fd
        ret = self._fn(fd.fd, calls, reg, callback, fd.run_struct)
        if ret:
            raise SystemExit(f"callback loop failed: errno {-ret}")


def median(values: Sequence[float]) -> float:
    return statistics.median(values)

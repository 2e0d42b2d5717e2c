"""`pyvmm run` on any host up to its first KVM_RUN, with an arm64 KVM faked at the one place
pyvmm issues ioctls (pyvmm.kvm.fds's libc): what it has imported and how much memory it holds
by then, the start-up a guest waits for.

    python -m tests.unit.first_kvm_run [--mem-mib N] -- RUN-OPTIONS...

prints one JSON object at vCPU 0's first KVM_RUN and exits: `modules` (sorted sys.modules),
`own_kib` (resident memory but the guest RAM mapping's), `guest_kib` (the guest RAM's: the images
loaded), `vm_hwm_kib` (the peak in all), `threads`, and `seconds` from $FIRST_KVM_RUN_STARTED (the
caller's time.monotonic(), a system-wide clock) when it is set. Every ioctl but these few succeeds and returns 0:
the API version, the capabilities pyvmm requires, fds for the VM, vCPUs and devices, vCPU
MPIDRs (from their index, as KVM assigns them) and the preferred target. /dev/kvm itself is a
memfd, so that this runs where there is no KVM at all.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import pyvmm.kvm.fds as fds
from kvm_bindings import ffi
from kvm_bindings import ioctls as io
from kvm_bindings import libc as real_libc
from kvm_bindings.constants import KVM_API_VERSION, Cap
from kvm_bindings.regs import SYS_REGS

CAPS: dict[int, int] = {Cap.ONE_REG: 1, Cap.ARM_PSCI_0_2: 1, Cap.IMMEDIATE_EXIT: 1, Cap.MAX_VCPUS: 512, Cap.ARM_VM_IPA_SIZE: 48,
        Cap.ARM_NISV_TO_USER: 1}
RUN_MMAP_SIZE = 3 * 4096


def status() -> dict[str, int]:
    """/proc/self/status's numbers (sizes in KiB)."""
    with open("/proc/self/status") as f:
        fields = (line.split(":", 1) for line in f)
        return {k: int(v.split()[0]) for k, v in fields if v.split() and v.split()[0].isdigit()}


def resident(mem_mib: int) -> tuple[int, int]:
    """KiB resident (everything but the guest RAM mapping, the guest RAM mapping): that mapping is
    `mem_mib` plus its alignment slack (pyvmm/machine/memory.py), as benchmarks/boot.py finds it."""
    own = guest = 0
    in_guest = False
    with open("/proc/self/smaps") as f:
        for line in f:
            first = line.split(" ", 1)[0]
            if "-" in first and not line.startswith(("Rss", "Size")):
                start, end = (int(v, 16) for v in first.split("-"))
                in_guest = (mem_mib << 20) <= end - start <= (mem_mib + 32) << 20
            elif line.startswith("Rss:"):
                kib = int(line.split()[1])
                own, guest = (own, guest + kib) if in_guest else (own + kib, guest)
    return own, guest


class FakeKvmLibc:
    """libc, with ioctl answered as an arm64 KVM would answer what `pyvmm run` asks before it runs."""

    def __init__(self, mem_mib: int) -> None:
        self.mem_mib = mem_mib
        self.vcpu_index: dict[int, int] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(real_libc, name)

    def ioctl(self, fd: int, request: int, arg: Any) -> int:
        if request == io.KVM_GET_API_VERSION:
            return KVM_API_VERSION
        if request == io.KVM_CHECK_EXTENSION:
            return CAPS.get(int(ffi.cast("intptr_t", arg)), 0)
        if request == io.KVM_GET_VCPU_MMAP_SIZE:
            return RUN_MMAP_SIZE
        if request in (io.KVM_CREATE_VM, io.KVM_CREATE_VCPU):
            new = os.memfd_create("fake-kvm")
            os.ftruncate(new, RUN_MMAP_SIZE)  # a vCPU's kvm_run is mapped from it
            self.vcpu_index[new] = int(ffi.cast("intptr_t", arg))
            return new
        if request == io.KVM_CREATE_DEVICE:
            arg.fd = os.memfd_create("fake-kvm-device")
        elif request == io.KVM_ARM_PREFERRED_TARGET:
            arg.target = 5  # KVM_ARM_TARGET_GENERIC_V8
        elif request == io.KVM_GET_ONE_REG and arg.id == SYS_REGS["mpidr_el1"]:
            ffi.cast("uint64_t *", arg.addr)[0] = (1 << 31) | self.vcpu_index.get(fd, 0)
        elif request == io.KVM_RUN:
            self.report()
        return 0

    def report(self) -> None:
        modules = sorted(sys.modules)  # before json, which this report alone may load
        started = os.environ.get("FIRST_KVM_RUN_STARTED")
        seconds = time.monotonic() - float(started) if started else None
        own, guest = resident(self.mem_mib)
        now = status()
        import json

        print(json.dumps({"modules": modules, "own_kib": own, "guest_kib": guest, "vm_hwm_kib": now["VmHWM"],
                          "threads": now["Threads"], "seconds": seconds}), flush=True)
        os._exit(0)


class _OsWithoutKvm:
    """os, with /dev/kvm opened as a memfd: the ioctls made on it are answered above."""

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    @staticmethod
    def open(path: str, flags: int, mode: int = 0o777) -> int:
        return os.memfd_create("fake-dev-kvm") if path == "/dev/kvm" else os.open(path, flags, mode)


class _Aarch64:
    """os.uname() with machine "aarch64": Vm checks it before it opens /dev/kvm."""

    def __init__(self, real: os.uname_result) -> None:
        self._real = real

    def __getattr__(self, name: str) -> str:
        return "aarch64" if name == "machine" else str(getattr(self._real, name))


def main(argv: list[str]) -> int:
    mem_mib = 64
    if argv[:1] == ["--mem-mib"]:
        mem_mib, argv = int(argv[1]), argv[2:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    real_uname = os.uname
    os.uname = lambda: _Aarch64(real_uname())  # type: ignore[assignment,return-value]
    setattr(fds, "libc", FakeKvmLibc(mem_mib))  # noqa: B010 (the module's own names, replaced)
    setattr(fds, "os", _OsWithoutKvm())  # noqa: B010
    from pyvmm.cli import main as pyvmm_main

    ended = pyvmm_main(["run", "-m", str(mem_mib), *argv])
    print(f"pyvmm run ended with status {ended} before its first KVM_RUN", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

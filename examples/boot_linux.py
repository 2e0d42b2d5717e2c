"""`make demo`, part one: Debian's arm64 Linux boots on 2 vCPUs under pyvmm.

Every PSCI call the kernel makes (PSCI_VERSION, FEATURES, CPU_ON for the second CPU, SYSTEM_OFF)
is answered by pyvmm's PSCI 1.1 in Python and traced, and so is every SDEI call of its SDEI
driver (VERSION, PRIVATE_RESET on each CPU, SHARED_RESET, PE_UNMASK as each CPU comes online);
the guest's console follows. The guest
images are Debian's kernel Image and a busybox initramfs, built by `make guest-images`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pyvmm import Vm, VmmError
from pyvmm.boot import boot
from pyvmm.smccc.trace import TracePrinter

IMAGES = Path(os.environ.get("PYVMM_GUEST_IMAGES", Path(__file__).resolve().parents[1] / ".cache" / "armhost" / "guest"))


def main() -> int:
    print("== Debian arm64 Linux on 2 vCPUs, 256 MiB; PSCI and SDEI serviced by pyvmm, traced ==", flush=True)
    try:
        with Vm(cpus=2, mem_mib=256) as vm:
            vm.smccc.trace = TracePrinter(sys.stdout)
            vm.enable_sdei()
            boot(vm, kernel=str(IMAGES / "Image"), initrd=str(IMAGES / "initrd.cpio"), cmdline="console=ttyS0 quiet")
            result = vm.run(timeout=240)
    except VmmError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 1
    print(f"== guest ended: {result} after {result.elapsed:.1f} s ==")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())

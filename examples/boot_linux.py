"""`make demo`, part one: Debian's arm64 Linux boots on 2 vCPUs under pyvmm.

Every PSCI call the kernel makes (PSCI_VERSION, FEATURES, CPU_ON for the second CPU, SYSTEM_OFF)
is answered by pyvmm's PSCI 1.1 in Python and traced, and so is every SDEI call of its SDEI
driver (VERSION, PRIVATE_RESET on each CPU, SHARED_RESET, PE_UNMASK as each CPU comes online);
the guest's console follows. It also has a virtio-blk disk (a tar archive it reads a file from)
and a virtio-rng device (it prints a few random bytes). The guest images are Debian's kernel
Image and a busybox initramfs, built by `make guest-images`.
"""

from __future__ import annotations

import io
import os
import sys
import tarfile
import tempfile
from pathlib import Path

from pyvmm import Vm, VmmError
from pyvmm.boot.load import boot
from pyvmm.devices.virtio.blk import VirtioBlk
from pyvmm.devices.virtio.rng import VirtioRng
from pyvmm.smccc.trace import TracePrinter

IMAGES = Path(os.environ.get("PYVMM_GUEST_IMAGES", Path(__file__).resolve().parents[1] / ".cache" / "armhost" / "guest"))


# what the guest runs once up (its /init takes pyvmm.run=, with commas for spaces)
GUEST_COMMANDS = ("echo PYVMM-GUEST: read from /dev/vda: $(tar -xOf /dev/vda hello.txt); "
                  "echo PYVMM-GUEST: from /dev/hwrng: $(head -c 8 /dev/hwrng | od -An -tx1)")


def disk_image(path: Path) -> None:
    """A raw disk holding a tar archive with one file."""
    data = b"hello from a virtio-blk disk"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("hello.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue().ljust(64 << 10, b"\0"))


def main() -> int:
    print("== Debian arm64 Linux on 2 vCPUs, 256 MiB; PSCI and SDEI serviced by pyvmm, traced; "
          "a virtio disk and entropy ==", flush=True)
    try:
        with tempfile.TemporaryDirectory(prefix="pyvmm-demo-") as tmp, Vm(cpus=2, mem_mib=256) as vm:
            vm.smccc.trace = TracePrinter(sys.stdout)
            vm.enable_sdei()
            disk = Path(tmp) / "disk.img"
            disk_image(disk)
            vm.add_virtio(VirtioBlk(str(disk)))
            vm.add_virtio(VirtioRng())
            boot(vm, kernel=str(IMAGES / "Image"), initrd=str(IMAGES / "initrd.cpio"),
                 cmdline=f"console=ttyS0 quiet pyvmm.run={GUEST_COMMANDS.replace(' ', ',')}")
            result = vm.run(timeout=240)
    except VmmError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 1
    print(f"== guest ended: {result} after {result.elapsed:.1f} s ==")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())

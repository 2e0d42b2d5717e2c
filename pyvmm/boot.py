"""Putting a guest in RAM and pointing vCPU 0 at it: a Linux Image (-k) or raw firmware (-f),
an optional initrd, and the machine's device tree, whose address goes in x0 (booting.rst)."""

from __future__ import annotations

import os

from devicetree.builder import build_dtb
from devicetree.machvirt import machine_tree
from pyvmm.errors import ImageError, VmmError
from pyvmm.loader import DTB_MAX, KernelImage, parse_image, place
from pyvmm.vm import Vm


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise VmmError(f"cannot read {what} {path}: {e.strerror}") from None
    if not data:
        raise ImageError(f"{what} {path} is empty")
    return data


def boot(vm: Vm, *, kernel: str | None = None, firmware: str | None = None, initrd: str | None = None,
         cmdline: str = "", sdei: bool = False) -> bytes:
    """Load the guest and its DTB; returns the DTB. Exactly one of kernel/firmware is given."""
    if (kernel is None) == (firmware is None):
        raise VmmError("boot a kernel (-k) or a firmware (-f), one of them")
    if kernel is not None:
        image = parse_image(_read(kernel, "kernel"), os.path.basename(kernel))
    else:
        data = _read(firmware, "firmware")  # type: ignore[arg-type]
        image = KernelImage(data, 0, len(data), 0)  # raw: at the start of RAM, entered at its first byte
    initrd_data = _read(initrd, "initrd") if initrd is not None else b""
    ram = vm.memory.find(vm.ram_base)
    layout = place(vm.ram_base, ram.size, image, len(initrd_data))
    vm.load(image.data, layout.kernel)
    initrd_range = None
    if initrd_data:
        vm.load(initrd_data, layout.initrd)
        initrd_range = (layout.initrd, layout.initrd + len(initrd_data))
    tree = machine_tree(vm, bootargs=cmdline, initrd=initrd_range, stdout=f"/uart@{vm.serial.base:x}", sdei=sdei)
    dtb = build_dtb(tree)
    if len(dtb) > DTB_MAX:
        raise ImageError(f"the device tree is {len(dtb)} bytes, over the 2 MiB booting.rst allows")
    vm.load(dtb, layout.dtb)
    vm.set_boot(layout.kernel, x0=layout.dtb)
    return dtb

"""Putting a guest in RAM and pointing vCPU 0 at it: a Linux Image (-k) or raw firmware (-f),
an optional initrd, and the machine's device tree, whose address goes in x0 (booting.rst)."""

from __future__ import annotations

import logging
import os

from devicetree.builder import build_dtb
from pyvmm.boot.kernel import (
    DTB_MAX,
    HEADER,
    KernelImage,
    parse_aarch32_image,
    parse_image,
    place,
    placement_size,
    unpack_kernel,
)
from pyvmm.errors import ImageError, VmmError
from pyvmm.machine.images import file_size
from pyvmm.machine.vm import Vm

log = logging.getLogger("pyvmm")


def _header(path: str, size: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(min(size, HEADER.size))


def boot(vm: Vm, *, kernel: str | None = None, firmware: str | None = None, initrd: str | None = None,
         cmdline: str = "", console: str | None = None, kaslr_seed: int | None = None) -> bytes:
    """Load the guest and its DTB; returns the DTB. Exactly one of kernel/firmware is given.
    `console`: a Linux kernel (an Image or zImage, not a flat binary) whose `cmdline` names no
    console gets console=CONSOLE first, as kvmtool gives it unless --nodefaults. `kaslr_seed`:
    /chosen/kaslr-seed (default: a random one)."""
    unpacked: bytes | None = None
    if (kernel is None) == (firmware is None):
        raise VmmError("boot a kernel (-k) or a firmware (-f), one of them")
    path = kernel if kernel is not None else firmware
    assert path is not None
    size = file_size(path, "kernel" if kernel is not None else "firmware")
    ram = vm.memory.find(vm.ram_base)
    if kernel is not None and vm.aarch32:
        image = parse_aarch32_image(_header(path, size), os.path.basename(path), file_size=size)
        if image.headerless:
            log.warning("kernel %s is not a zImage: loaded as a flat AArch32 binary at RAM + %#x, "
                        "as kvmtool does", path, image.text_offset)
    elif kernel is not None:
        name = os.path.basename(path)
        unpacked = unpack_kernel(path, name, ram.size)
        if unpacked is not None:
            image = parse_image(unpacked[:HEADER.size], name, file_size=len(unpacked))
            if image.headerless:
                raise ImageError(f"{name} unpacks to something that is not an arm64 Linux Image")
            log.info("kernel %s: an Image of %d MiB unpacked", path, len(unpacked) >> 20)
        else:
            image = parse_image(_header(path, size), name, file_size=size)
        if image.headerless:
            log.warning("kernel %s has no arm64 Image header: loaded as a flat binary at RAM + %#x, "
                        "as kvmtool does", path, image.text_offset)
    else:
        image = KernelImage(0, size, 0)  # raw: at the start of RAM, entered at its first byte
    if kernel is not None and not image.headerless and console is not None and "console=" not in cmdline:
        cmdline = f"console={console} {cmdline}".strip()
    initrd_size = file_size(initrd, "initrd") if initrd is not None else 0
    layout = place(vm.ram_base, placement_size(ram.size, vm.aarch32), image, initrd_size,
                   "kernel" if kernel is not None else "firmware")
    if unpacked is not None:
        vm.load(unpacked, layout.kernel)
    else:
        vm.load_file(path, layout.kernel)  # straight from the file into guest RAM
    initrd_range = None
    if initrd is not None:
        vm.load_file(initrd, layout.initrd)
        initrd_range = (layout.initrd, layout.initrd + initrd_size)
    dtb = build_dtb(vm.device_tree(bootargs=cmdline, initrd=initrd_range, stdout=f"/uart@{vm.serial.base:x}",
                                   kaslr_seed=kaslr_seed))
    if len(dtb) > DTB_MAX:
        raise ImageError(f"the device tree is {len(dtb)} bytes, over the 2 MiB booting.rst allows")
    vm.load(dtb, layout.dtb)
    if vm.aarch32:  # arm/booting.rst: r0 = 0, r1 = ~0 (the DTB names the machine), r2 = the DTB
        vm.set_boot(layout.kernel, x0=0, more=(0xFFFF_FFFF, layout.dtb))
    else:
        vm.set_boot(layout.kernel, x0=layout.dtb)
    return dtb

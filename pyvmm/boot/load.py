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
    gzip_data,
    parse_aarch32_image,
    parse_image,
    place,
    placement_size,
    unpacked_head,
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
    if (kernel is None) == (firmware is None):
        raise VmmError("boot a kernel (-k) or a firmware (-f), one of them")
    path = kernel if kernel is not None else firmware
    assert path is not None
    size = file_size(path, "kernel" if kernel is not None else "firmware")
    ram = vm.memory.find(vm.ram_base)
    unpacked = False  # a compressed kernel is in RAM already
    if kernel is not None and vm.aarch32:
        image = parse_aarch32_image(_header(path, size), os.path.basename(path), file_size=size)
        if image.headerless:
            log.warning("kernel %s is not a zImage: loaded as a flat AArch32 binary at RAM + %#x, "
                        "as kvmtool does", path, image.text_offset)
    elif kernel is not None:
        image, unpacked = _arm64_kernel(vm, path, size)
    else:
        image = KernelImage(0, size, 0)  # raw: at the start of RAM, entered at its first byte
    if kernel is not None and not image.headerless and console is not None and "console=" not in cmdline:
        cmdline = f"console={console} {cmdline}".strip()
    initrd_size = file_size(initrd, "initrd") if initrd is not None else 0
    layout = place(vm.ram_base, placement_size(ram.size, vm.aarch32), image, initrd_size,
                   "kernel" if kernel is not None else "firmware")
    if not unpacked:
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


def _arm64_kernel(vm: Vm, path: str, size: int) -> tuple[KernelImage, bool]:
    """An arm64 kernel's Image header, and whether it was compressed: then it is unpacked into RAM
    here, where its header places it (RAM + text_offset), as it is read and with no copy kept in
    pyvmm's memory (a reset unpacks it again)."""
    name = os.path.basename(path)
    data = gzip_data(path, name)
    if data is None:
        image = parse_image(_header(path, size), name, file_size=size)
        if image.headerless:
            log.warning("kernel %s has no arm64 Image header: loaded as a flat binary at RAM + %#x, "
                        "as kvmtool does", path, image.text_offset)
        return image, False
    head = unpacked_head(path, data, name)
    header = parse_image(head, name, file_size=len(head))  # the checks of the header alone
    if header.headerless:
        raise ImageError(f"{name} unpacks to something that is not an arm64 Linux Image")
    unpacked = vm.load_gzip(path, vm.ram_base + header.text_offset, data.offset, data.length)
    image = parse_image(head, name, file_size=unpacked)  # and those against the Image's size
    log.info("kernel %s: an Image of %d MiB unpacked", path, unpacked >> 20)
    return image, True

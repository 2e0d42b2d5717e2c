"""Loading a Linux guest: the arm64 Image format and the placement of kernel, initrd and DTB.

Documentation/arch/arm64/booting.rst:
  * the 64-byte header carries text_offset (u64 @8), image_size (u64 @16), flags (u64 @24) and the
    magic "ARM\\x64" (u32 @56); an image_size of 0 means a pre-3.17 kernel with text_offset 0x80000;
  * flags bit 0 is the kernel's endianness (pyvmm runs little-endian guests only);
  * the Image goes text_offset bytes above a 2 MiB aligned base, and image_size bytes from there
    (BSS included) must be free RAM;
  * the DTB is 8-byte aligned and at most 2 MiB; the initrd anywhere in RAM, not overlapping.
The kernel goes at the start of RAM, the DTB in the last 2 MiB, the initrd right below the DTB.
A kernel with no Image header (kvm-unit-tests' .flat files) is taken as kvmtool takes it
(arm/kvm.c): a flat binary at RAM + 0x80000, entered at its first byte.

Distributions ship arm64 kernels three ways, and all three boot, as under QEMU (hw/arm/boot.c):
a plain Image (loaded straight from the file), a gzip-compressed Image (Ubuntu's vmlinuz), and an
EFI zboot image (drivers/firmware/efi/libstub/zboot-header.S: "MZ", "zimg" at 4, the payload's
offset and size at 8 and 12, its compression type at 24) whose payload is gzip; both are
unpacked straight into guest RAM as they are read, never to more bytes than RAM holds, and no
copy is kept in pyvmm's memory (a reset unpacks them again: pyvmm/machine/images.py).

An AArch32 VM boots an AArch32 kernel as kvmtool's --aarch32 does: a zImage (Documentation/arch/
arm/booting.rst: magic 0x016f2818 at offset 0x24) or a flat binary at RAM + 0x8000, entered at its
first byte with r0 = 0, r1 = ~0 (no machine type: the DTB describes the machine), r2 = the DTB.
An AArch32 kernel needs its DTB and initrd in lowmem, so they go at the top of the first 256 MiB
of RAM rather than of all of it (kvmtool's limit too).
"""

from __future__ import annotations

import os
import struct
from typing import NamedTuple

from pyvmm.errors import ImageError
from pyvmm.machine.images import gunzip

IMAGE_MAGIC = 0x644D_5241  # "ARM\x64"
HEADER = struct.Struct("<II3Q3QII")  # code0, code1, text_offset, image_size, flags, res2-4, magic, res5
SZ_2M = 2 << 20
# The guest's smallest translation granule (booting.rst aligns to it), whatever the host's page
# size: a 16K-page host boots 4K-page guests, and host alignment is pyvmm/machine/memory.py's business.
GUEST_PAGE = 4096
DTB_MAX = SZ_2M
LEGACY_TEXT_OFFSET = 0x80000
ZIMAGE_MAGIC = 0x016F_2818  # u32 @0x24 of an arm zImage
ZIMAGE_MAGIC_OFFSET = 0x24
AARCH32_TEXT_OFFSET = 0x8000  # kvmtool's ARM_KERN_OFFSET for AArch32 guests
AARCH32_LOWMEM = 256 << 20  # where an AArch32 kernel can surely reach its DTB and initrd


def placement_size(ram_size: int, aarch32: bool) -> int:
    """How much of RAM, from its start, kernel, initrd and DTB may be placed in."""
    return min(ram_size, AARCH32_LOWMEM) if aarch32 else ram_size


class KernelImage(NamedTuple):
    text_offset: int
    image_size: int  # bytes the kernel occupies once running (BSS included)
    flags: int
    headerless: bool = False  # no Image header: a flat binary, placed as kvmtool places it


class Layout(NamedTuple):
    kernel: int
    initrd: int
    dtb: int


GZIP_MAGIC = b"\x1f\x8b"
ZBOOT_MAGIC = (b"MZ", b"zimg")  # @0 and @4
ZBOOT = struct.Struct("<2sH4sII8x32s")  # MZ, -, zimg, payload offset, payload size, -, compression type


class GzipData(NamedTuple):
    """Where a compressed kernel's gzip data is in its file: from `offset`, `length` bytes (None:
    to the end of the file)."""

    offset: int
    length: int | None


def gzip_data(path: str, name: str) -> GzipData | None:
    """The gzip data of a gzip-compressed kernel or a gzip EFI zboot image; None for anything
    else (the file is then loaded as it is). An ImageError in one line for a zboot image pyvmm
    cannot unpack."""
    with open(path, "rb") as f:
        head = f.read(ZBOOT.size)
        if head[:2] == GZIP_MAGIC:
            return GzipData(0, None)
        if len(head) < ZBOOT.size or (head[:2], head[4:8]) != ZBOOT_MAGIC:
            return None
        _, _, _, offset, length, kind = ZBOOT.unpack(head)
        compression = kind.split(b"\0")[0].decode(errors="replace")
        if compression != "gzip":
            raise ImageError(f"{name} is an EFI zboot image compressed with {compression!r}: pyvmm unpacks gzip "
                             "ones, as QEMU does; boot the Image it holds")
        if not length or offset + length > os.fstat(f.fileno()).st_size:
            raise ImageError(f"{name} is an EFI zboot image whose payload runs past the end of the file")
        return GzipData(offset, length)


def unpacked_head(path: str, data: GzipData, name: str, size: int = HEADER.size) -> bytes:
    """The first `size` bytes `data` unpacks to (fewer if it unpacks to fewer): an Image's header,
    read before the Image is unpacked where it belongs."""
    head = b""
    for piece in gunzip(path, data.offset, data.length, name, limit=None, chunk=size):
        head += piece
        if len(head) >= size:
            break
    return head[:size]


def unpack_kernel(path: str, name: str, limit: int) -> bytes | None:
    """The Image inside a gzip-compressed kernel or a gzip EFI zboot image, as bytes; None for
    anything else. An ImageError in one line for what cannot be unpacked; `limit` is the most
    bytes the Image may have. (A guest's kernel is unpacked straight into its RAM instead:
    pyvmm/boot/load.py.)"""
    data = gzip_data(path, name)
    if data is None:
        return None
    return b"".join(gunzip(path, data.offset, data.length, name, limit))


def parse_image(data: bytes, name: str = "kernel", file_size: int | None = None) -> KernelImage:
    """Check an Image's header; `data` holds at least its first 64 bytes, `file_size` the whole
    file's size (default len(data))."""
    size = len(data) if file_size is None else file_size
    if size < HEADER.size or len(data) < HEADER.size:
        if size and len(data) == size and data[:2] != b"\x1f\x8b":
            return KernelImage(LEGACY_TEXT_OFFSET, size, 0, headerless=True)  # a small flat binary
        raise ImageError(f"{name} is {size} bytes, too short for an arm64 Image (64-byte header)")
    _, _, text_offset, image_size, flags, _, _, _, magic, _ = HEADER.unpack_from(data)
    if magic != IMAGE_MAGIC:
        if data[:2] == b"\x1f\x8b":
            raise ImageError(f"{name} is gzip data, not an arm64 Linux Image: decompress it, e.g. zcat vmlinuz > Image")
        if data[:4] == b"\x7fELF":
            raise ImageError(f"{name} is an ELF file (a vmlinux?): boot the Image, arch/arm64/boot/Image")
        if data[:2] == b"MZ" and data[4:8] == b"zimg":
            raise ImageError(f"{name} is an EFI zboot image: boot the uncompressed Image it holds")
        # kvmtool's way with a kernel that has no Image header (kvm-unit-tests' .flat files):
        # a flat binary at RAM start + its default TEXT_OFFSET, entered at its first byte
        return KernelImage(LEGACY_TEXT_OFFSET, size, 0, headerless=True)
    if flags & 1:
        raise ImageError(f"{name} is a big-endian kernel; pyvmm runs little-endian guests")
    if image_size == 0:
        text_offset, image_size = LEGACY_TEXT_OFFSET, size
    if image_size < size:
        raise ImageError(f"{name} header says image_size {image_size:#x}, smaller than the file ({size:#x})")
    if text_offset % GUEST_PAGE:
        raise ImageError(f"{name} has text_offset {text_offset:#x}, not page aligned")
    return KernelImage(text_offset, image_size, flags)


def parse_aarch32_image(data: bytes, name: str = "kernel", file_size: int | None = None) -> KernelImage:
    """An AArch32 kernel: a zImage, or headerless (a flat binary); `data` is its first bytes."""
    size = len(data) if file_size is None else file_size
    if len(data) >= HEADER.size and HEADER.unpack_from(data)[8] == IMAGE_MAGIC:
        raise ImageError(f"{name} is an arm64 Image: an AArch32 VM (--aarch32) boots an AArch32 kernel (zImage)")
    if data[:2] == b"\x1f\x8b":
        raise ImageError(f"{name} is gzip data, not an AArch32 zImage")
    if data[:4] == b"\x7fELF":
        raise ImageError(f"{name} is an ELF file (a vmlinux?): boot the zImage, arch/arm/boot/zImage")
    magic_end = ZIMAGE_MAGIC_OFFSET + 4
    zimage = len(data) >= magic_end and int.from_bytes(data[ZIMAGE_MAGIC_OFFSET:magic_end], "little") == ZIMAGE_MAGIC
    return KernelImage(AARCH32_TEXT_OFFSET, size, 0, headerless=not zimage)


def place(ram_base: int, ram_size: int, image: KernelImage, initrd_size: int, what: str = "kernel") -> Layout:
    """Addresses for kernel, initrd and DTB in [ram_base, ram_base + ram_size)."""
    if ram_base % SZ_2M:
        raise ImageError(f"RAM at {ram_base:#x} is not 2 MiB aligned, as an arm64 kernel needs")
    kernel = ram_base + image.text_offset
    kernel_end = kernel + image.image_size
    ram_end = ram_base + ram_size
    dtb = (ram_end - DTB_MAX) & ~(SZ_2M - 1)
    initrd = (dtb - initrd_size) & ~(GUEST_PAGE - 1)
    if dtb < ram_base or initrd < kernel_end:
        need = (image.text_offset + image.image_size + initrd_size + DTB_MAX + SZ_2M - 1) >> 20
        raise ImageError(f"the {what} ({image.image_size >> 20} MiB), initrd ({initrd_size >> 20} MiB) and device tree "
                         f"do not fit in {ram_size >> 20} MiB of RAM; give at least {need + 1} MiB (-m)")
    return Layout(kernel, initrd, dtb)

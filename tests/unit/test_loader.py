"""arm64 Image parsing and guest layout (Documentation/arch/arm64/booting.rst)."""

from __future__ import annotations

import gzip
import re
import struct
import tracemalloc
import zlib
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest

from devicetree.builder import Node
from pyvmm.boot.kernel import (
    DTB_MAX,
    IMAGE_MAGIC,
    KernelImage,
    gzip_data,
    parse_aarch32_image,
    parse_image,
    place,
    placement_size,
    unpack_kernel,
    unpacked_head,
)
from pyvmm.boot.load import boot
from pyvmm.errors import ImageError, VmmError
from pyvmm.machine.images import BlobImage, Image
from pyvmm.machine.memory import GuestMemory
from pyvmm.machine.vm import Vm

RAM = 0x8000_0000


def image(text_offset: int = 0, image_size: int = 0x20_0000, flags: int = 0x2, body: int = 0x1000,
          magic: int = IMAGE_MAGIC) -> bytes:
    header = struct.pack("<II3Q3QII", 0x1400_0000, 0, text_offset, image_size, flags, 0, 0, 0, magic, 0)
    return header + bytes(body - len(header))


def test_header_fields() -> None:
    k = parse_image(image(text_offset=0x8_0000, image_size=0x30_0000, flags=0xA))
    assert (k.text_offset, k.image_size, k.flags) == (0x8_0000, 0x30_0000, 0xA)


def test_pre_3_17_kernels_get_the_legacy_text_offset() -> None:
    k = parse_image(image(image_size=0))
    assert (k.text_offset, k.image_size) == (0x8_0000, 0x1000)


def test_a_kernel_without_an_image_header_is_a_flat_binary_at_0x80000_as_under_kvmtool() -> None:
    for data in (image(magic=0), b"\x00\x00\x00\x14" * 4):  # a kvm-unit-tests .flat, a tiny one
        k = parse_image(data, "psci.flat")
        assert (k.text_offset, k.image_size, k.headerless) == (0x8_0000, len(data), True)
    assert place(RAM, 16 << 20, parse_image(image(magic=0)), 0).kernel == RAM + 0x8_0000


@pytest.mark.parametrize(("data", "message"), [
    (b"", "too short"),
    (b"\x1f\x8b\x08" + bytes(100), "gzip data, not an arm64 Linux Image: decompress it"),
    (b"\x1f\x8b\x08", "too short"),
    (b"\x7fELF\x02\x01\x01" + bytes(100), "an ELF file"),
    (b"MZ\x00\x00zimg" + bytes(100), "an EFI zboot image"),
    (image(flags=0x3), "big-endian"),
    (image(image_size=0x100), "smaller than the file"),
    (image(text_offset=0x123), "not page aligned"),
])
def test_bad_images_are_refused_in_one_line(data: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=message) as e:
        parse_image(data, "Image")
    assert "\n" not in str(e.value)


def test_layout_kernel_at_start_dtb_at_top_initrd_below() -> None:
    k = parse_image(image(image_size=0x200_0000))
    layout = place(RAM, 64 << 20, k, 0x10_0123)
    assert layout.kernel == RAM
    assert layout.dtb == RAM + (62 << 20) and layout.dtb % 8 == 0
    assert layout.initrd % 4096 == 0 and layout.initrd + 0x10_0123 <= layout.dtb
    assert layout.initrd >= RAM + 0x200_0000


def test_layout_that_does_not_fit_says_how_much_ram_is_needed() -> None:
    k = parse_image(image(image_size=0x300_0000))
    with pytest.raises(ImageError, match=r"do not fit in 32 MiB of RAM; give at least \d+ MiB"):
        place(RAM, 32 << 20, k, 8 << 20)


def test_aarch32_kernels_go_at_0x8000_as_under_kvmtool() -> None:
    zimage = bytearray(0x200)
    zimage[0x24:0x28] = (0x016F_2818).to_bytes(4, "little")
    assert parse_aarch32_image(bytes(zimage)) == KernelImage(0x8000, 0x200, 0, headerless=False)
    assert parse_aarch32_image(b"\x00" * 32) == KernelImage(0x8000, 32, 0, headerless=True)
    with pytest.raises(ImageError, match="is an arm64 Image"):
        parse_aarch32_image(image())


def test_an_aarch32_dtb_and_initrd_stay_in_lowmem() -> None:
    ram = 2 << 30
    image32 = parse_aarch32_image(b"\x00" * 64)
    layout = place(RAM, placement_size(ram, aarch32=True), image32, 8 << 20)
    assert layout.dtb + DTB_MAX <= RAM + (256 << 20) and layout.initrd < layout.dtb
    assert layout.kernel == RAM + 0x8000
    assert place(RAM, placement_size(ram, aarch32=False), parse_image(image()), 0).dtb > RAM + (256 << 20)  # at the top


def zboot(payload: bytes, compression: bytes = b"gzip") -> bytes:
    """An EFI zboot image as drivers/firmware/efi/libstub/zboot-header.S lays it out."""
    offset = 0x200
    header = struct.pack("<2sH4sII8x32s", b"MZ", 0, b"zimg", offset, len(payload), compression)
    return header + bytes(offset - len(header)) + payload


def test_gzip_and_zboot_kernels_unpack_to_their_image(tmp_path: Path) -> None:
    kernel = image(body=0x3000)
    for name, data in (("vmlinuz", gzip.compress(kernel)), ("vmlinuz.efi", zboot(gzip.compress(kernel)))):
        (tmp_path / name).write_bytes(data)
        assert unpack_kernel(str(tmp_path / name), name, 1 << 20) == kernel
    (tmp_path / "Image").write_bytes(kernel)
    assert unpack_kernel(str(tmp_path / "Image"), "Image", 1 << 20) is None  # loaded from the file as it is


@pytest.mark.parametrize(("data", "message"), [
    (zboot(b"\x28\xb5\x2f\xfd", b"zstd22"), "an EFI zboot image compressed with 'zstd22': pyvmm unpacks gzip ones"),
    (zboot(b"")[:0x200], "payload runs past the end of the file"),
    (gzip.compress(bytes(4 << 20)), "unpacks to more than the 1 MiB of RAM"),
    (gzip.compress(bytes(range(256)) * 64)[:100], "its gzip data is cut short"),
    (b"\x1f\x8b\x08" + bytes(200), "its gzip data is corrupt"),
])
def test_kernels_that_cannot_be_unpacked_are_one_line(tmp_path: Path, data: bytes, message: str) -> None:
    path = tmp_path / "vmlinuz"
    path.write_bytes(data)
    with pytest.raises(ImageError, match=re.escape(message)):
        unpack_kernel(str(path), "vmlinuz", 1 << 20)


class LoaderVm:
    """What boot() uses of a Vm: guest RAM, and Vm's own loading methods, whose images go to a
    list that a reset would load again (vm.lifecycle.images)."""

    load, load_file, load_gzip, _add_image = Vm.load, Vm.load_file, Vm.load_gzip, Vm._add_image

    def __init__(self, mem_mib: int = 64) -> None:
        self.memory = GuestMemory()
        self.memory.add(RAM, mem_mib << 20)
        self.ram_base, self.aarch32 = RAM, False
        self.images: list[Image] = []
        self.lifecycle = SimpleNamespace(add_image=self.images.append)
        self.serial = SimpleNamespace(base=0x100_0000)
        self.entry = 0

    def device_tree(self, **_: object) -> Node:
        return Node("/")

    def set_boot(self, entry: int, x0: int = 0, more: tuple[int, ...] = ()) -> None:
        self.entry = entry

    def reset(self) -> None:
        """RAM zeroed and the images loaded again, as a guest's SYSTEM_RESET does."""
        self.memory.write(RAM, bytes(self.memory.regions[0].size))
        for loaded in self.images:
            loaded.load(self.memory)


@pytest.mark.parametrize("container", ["gzip", "zboot"])
@pytest.mark.parametrize("text_offset", [0, None])  # None: a pre-3.17 header (image_size 0: at 0x80000)
def test_a_compressed_kernel_is_unpacked_straight_into_ram_and_no_copy_is_kept(
        tmp_path: Path, container: str, text_offset: int | None) -> None:
    kernel = image(image_size=0 if text_offset is None else 0x20_0000, body=0x3000) + bytes(range(256)) * 16
    packed = gzip.compress(kernel)
    (tmp_path / "vmlinuz").write_bytes(packed if container == "gzip" else zboot(packed))
    vm = LoaderVm()
    boot(cast(Vm, vm), kernel=str(tmp_path / "vmlinuz"))
    at = RAM + (0x80000 if text_offset is None else 0)
    assert vm.entry == at and vm.memory.read(at, len(kernel)) == kernel
    assert not any(isinstance(i, BlobImage) and kernel[:64] in i.data for i in vm.images)  # the DTB's alone
    vm.reset()
    assert vm.memory.read(at, len(kernel)) == kernel


def test_unpacking_a_kernel_holds_a_chunk_of_it_not_all_of_it(tmp_path: Path) -> None:
    kernel = image(image_size=24 << 20, body=16 << 20)
    (tmp_path / "vmlinuz").write_bytes(gzip.compress(kernel))
    vm = LoaderVm()
    tracemalloc.start()
    try:
        boot(cast(Vm, vm), kernel=str(tmp_path / "vmlinuz"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert vm.memory.read(RAM, len(kernel)) == kernel
    assert peak < 4 << 20  # a few 1 MiB pieces, where the whole Image (16 MiB) was held twice


def test_a_kernel_that_unpacks_past_ram_is_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "vmlinuz").write_bytes(gzip.compress(image(body=2 << 20)))
    with pytest.raises(ImageError, match=re.escape("vmlinuz unpacks to more than the 1 MiB of RAM")):
        boot(cast(Vm, LoaderVm(mem_mib=1)), kernel=str(tmp_path / "vmlinuz"))


def test_an_image_header_is_read_whatever_pieces_the_gzip_data_comes_in(tmp_path: Path) -> None:
    kernel = image()
    path = tmp_path / "vmlinuz"
    # a stored (uncompressed) block of 10 bytes, then the rest: the header arrives in two pieces
    first, rest = zlib.compressobj(0, wbits=31), kernel[10:]
    path.write_bytes(first.compress(kernel[:10]) + first.flush(zlib.Z_FULL_FLUSH) + first.compress(rest) + first.flush())
    data = gzip_data(str(path), "vmlinuz")
    assert data is not None
    assert unpacked_head(str(path), data, "vmlinuz") == kernel[:64]
    assert unpacked_head(str(path), data, "vmlinuz", size=len(kernel) + 10) == kernel  # all there is


@pytest.mark.parametrize("grow", [0x1000, -0x1000])
def test_a_compressed_kernel_replaced_before_a_reset_is_one_line(tmp_path: Path, grow: int) -> None:
    """A reset unpacks the kernel again from its file: one that now unpacks to more or less than
    it did at boot (a kernel upgrade under a running guest) is said to have changed."""
    (tmp_path / "vmlinuz").write_bytes(gzip.compress(image(body=0x4000)))
    vm = LoaderVm()
    boot(cast(Vm, vm), kernel=str(tmp_path / "vmlinuz"))
    (tmp_path / "vmlinuz").write_bytes(gzip.compress(image(body=0x4000 + grow)))
    with pytest.raises(VmmError, match=re.escape(f"{tmp_path / 'vmlinuz'} changed since it was first loaded")):
        vm.reset()

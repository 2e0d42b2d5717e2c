"""arm64 Image parsing and guest layout (Documentation/arch/arm64/booting.rst)."""

from __future__ import annotations

import gzip
import re
import struct
from pathlib import Path

import pytest

from pyvmm.boot.kernel import (
    DTB_MAX,
    IMAGE_MAGIC,
    KernelImage,
    parse_aarch32_image,
    parse_image,
    place,
    placement_size,
    unpack_kernel,
)
from pyvmm.errors import ImageError

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

"""What is loaded into guest RAM before the guest starts, kept so that a reset loads it again."""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator
from typing import NamedTuple

from pyvmm.errors import ImageError, VmmError
from pyvmm.machine.memory import GuestMemory


class BlobImage(NamedTuple):
    """Bytes pyvmm made (the device tree)."""

    gpa: int
    data: bytes

    def load(self, memory: GuestMemory) -> None:
        memory.write(self.gpa, self.data)


class FileImage(NamedTuple):
    """`size` bytes of a file (kernel, initrd, firmware), read straight into guest RAM."""

    gpa: int
    path: str
    size: int

    def load(self, memory: GuestMemory) -> None:
        view = memory.view(self.gpa, self.size)  # bounds-checked
        try:
            with open(self.path, "rb") as f:
                got = f.readinto(view)
        except OSError as e:
            raise VmmError(f"cannot read {self.path}: {e.strerror}") from None
        finally:
            view.release()
        if got != self.size:
            raise VmmError(f"{self.path} changed while it was being loaded")


class GzipImage(NamedTuple):
    """`size` bytes unpacked from the gzip data at `offset` of a file (`length` bytes of it; None:
    to its end), a compressed kernel: unpacked straight into guest RAM at each load, so that no
    copy of it stays in pyvmm's own memory."""

    gpa: int
    path: str
    offset: int
    length: int | None
    size: int

    def load(self, memory: GuestMemory) -> None:
        try:
            size = _gunzip_into(memory, self.path, self.gpa, self.size, self.offset, self.length)
        except ImageError:  # its limit is the size it unpacked to before: the file is another now
            size = -1
        if size != self.size:
            raise VmmError(f"{self.path} changed since it was first loaded: it no longer unpacks to the same kernel")


Image = BlobImage | FileImage | GzipImage
GUNZIP_CHUNK = 1 << 20  # bytes unpacked at a time: what unpacking holds besides its destination


def gunzip(path: str, offset: int, length: int | None, name: str, limit: int | None,
           chunk: int = GUNZIP_CHUNK) -> Iterator[bytes]:
    """The bytes the gzip data (RFC 1952) at `offset` of a file unpacks to, `chunk` at a time;
    `length`: how many bytes of the file it may take (None: to its end). An ImageError in one
    line for data that is corrupt, cut short or unpacks to more than `limit` bytes (RAM's; None:
    the caller stops when it has what it wants)."""
    d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # the gzip container
    left = length
    out = 0
    with open(path, "rb") as f:
        f.seek(offset)
        try:
            while not d.eof:
                data = d.unconsumed_tail
                if not data:
                    data = f.read(chunk if left is None else min(chunk, left))
                    left = None if left is None else left - len(data)
                piece = d.decompress(data, chunk if limit is None else min(chunk, limit + 1 - out))
                if not piece and not data:
                    raise ImageError(f"{name}: its gzip data is cut short")
                out += len(piece)
                if limit is not None and out > limit:
                    raise ImageError(f"{name} unpacks to more than the {limit >> 20} MiB of RAM")
                yield piece
        except zlib.error as e:
            raise ImageError(f"{name}: its gzip data is corrupt ({e})") from None


def unpack_gzip(memory: GuestMemory, path: str, gpa: int, offset: int, length: int | None) -> GzipImage:
    """The gzip data at `offset` of a file unpacked into guest RAM at `gpa`, as much as the rest
    of its RAM region holds; the image that loads it again."""
    size = _gunzip_into(memory, path, gpa, memory.find(gpa).end - gpa, offset, length)
    return GzipImage(gpa, path, offset, length, size)


def _gunzip_into(memory: GuestMemory, path: str, gpa: int, room: int, offset: int, length: int | None) -> int:
    """gunzip() into the `room` bytes of guest RAM at `gpa`; returns how many it unpacked to."""
    view = memory.view(gpa, room)  # bounds-checked
    size = 0
    try:
        for piece in gunzip(path, offset, length, os.path.basename(path), room):
            view[size:size + len(piece)] = piece
            size += len(piece)
    except OSError as e:
        raise VmmError(f"cannot read {path}: {e.strerror}") from None
    finally:
        view.release()
    return size


def file_size(path: str | os.PathLike[str], what: str) -> int:
    """The size of a file about to be loaded; a one-line error if it is unreadable or empty."""
    try:
        size = os.stat(path).st_size
    except OSError as e:
        raise ImageError(f"cannot read {what} {os.fspath(path)}: {e.strerror}") from None
    if not size:
        raise ImageError(f"{what} {os.fspath(path)} is empty")
    return size


def file_image(path: str | os.PathLike[str], gpa: int, size: int) -> FileImage:
    return FileImage(gpa, os.fspath(path), size)

"""What is loaded into guest RAM before the guest starts, kept so that a reset loads it again."""

from __future__ import annotations

import os
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


Image = BlobImage | FileImage


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

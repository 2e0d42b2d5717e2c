"""A descriptor chain as a device sees it (virtio 1.2 §2.7.5): device-readable buffers, then
device-writable ones, as one host struct iovec array over guest RAM.

The iovec is the one form: a device hands it (or a byte range of it) straight to preadv,
pwritev, readv or writev, so a request moves with one system call and no Python object per
buffer. Zero-copy memoryviews of the same buffers are made only when a device asks for them
(`readable`, `writable`, `view`). Chain positions are byte offsets into the chain: the readable
bytes are [0, readable_len), the writable ones [readable_len, total). Framing is the driver's
choice (§2.6.4): a header may span buffers or share one with data, so a device reads and writes
by offset and never assumes a buffer per field.

Every buffer was checked against guest RAM when the chain was taken (queue.py,
linear_table.py); nothing here trusts the guest again.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from functools import lru_cache
from typing import Protocol

from pyvmm.devices.virtio.rings.layout import IOVEC

__all__ = ["Chain", "QueueError", "iovec_array"]

ENTRY = IOVEC.size


class QueueError(Exception):
    """The driver broke the split-ring rules: the device must be reset."""


class HostRam(Protocol):
    """What a chain needs of guest RAM's regions to turn a host address into a view."""

    host_addr: int
    size: int
    view: memoryview


@lru_cache(maxsize=64)
def iovec_array(count: int) -> struct.Struct:
    """`count` struct iovec, packed from base0, len0, base1, len1, ..."""
    return struct.Struct(f"<{2 * count}Q")


class Chain:
    """One available descriptor chain: `head` (its id for the used ring), `iov` (host struct
    iovec array, readable buffers first), `nr_readable` buffers readable, `readable_len` and
    `total` bytes."""

    __slots__ = ("head", "iov", "nr_readable", "readable_len", "total", "_ram", "_readable", "_writable")

    def __init__(self, head: int, iov: bytes, nr_readable: int, readable_len: int, total: int,
                 ram: Sequence[HostRam]) -> None:
        self.head, self.iov, self.nr_readable = head, iov, nr_readable
        self.readable_len, self.total, self._ram = readable_len, total, ram
        self._readable: list[memoryview] | None = None
        self._writable: list[memoryview] | None = None

    @property
    def count(self) -> int:
        """How many buffers (a linear indirect table's zero-length ones among them)."""
        return len(self.iov) // ENTRY

    @property
    def writable_len(self) -> int:
        return self.total - self.readable_len

    def length(self, k: int) -> int:
        """The length of buffer `k`."""
        length: int = IOVEC.unpack_from(self.iov, k * ENTRY)[1]
        return length

    def view(self, k: int) -> memoryview:
        """Buffer `k` as a zero-copy memoryview of guest RAM."""
        return self._view(k, *IOVEC.unpack_from(self.iov, k * ENTRY))

    def _view(self, k: int, host: int, length: int) -> memoryview:
        for r in self._ram:
            off = host - r.host_addr
            if 0 <= off and off + length <= r.size:
                return r.view[off:off + length]
        raise QueueError(f"buffer {k} of chain {self.head} is outside guest RAM")  # cannot happen: checked when taken

    def framed(self, header: int, status: int) -> tuple[memoryview, bytes, memoryview] | None:
        """The chain as Linux's drivers frame a request with a header and a status (virtio_blk's
        virtblk_add_req): its first buffer exactly `header` bytes and readable, its last exactly
        `status` bytes and writable. Returns views of those two and the iovec of the buffers
        between them, which a device hands to the kernel as it is; None for any other framing
        (the device then goes by offset). One call on a device's hot path, where going by
        offset (read, iov_range, write) walks the buffer lengths each time."""
        iov = self.iov
        if not 0 < self.nr_readable < len(iov) // ENTRY:
            return None  # the first buffer is not readable or the last not writable
        first, first_len = IOVEC.unpack_from(iov, 0)
        last, last_len = IOVEC.unpack_from(iov, len(iov) - ENTRY)
        if first_len != header or last_len != status:
            return None
        return self._view(0, first, header), iov[ENTRY:-ENTRY], self._view(len(iov) // ENTRY - 1, last, status)

    @property
    def readable(self) -> list[memoryview]:
        if self._readable is None:
            self._readable = [self.view(k) for k in range(self.nr_readable)]
        return self._readable

    @property
    def writable(self) -> list[memoryview]:
        if self._writable is None:
            self._writable = [self.view(k) for k in range(self.nr_readable, self.count)]
        return self._writable

    # --- by byte offset --------------------------------------------------------------------
    def locate(self, offset: int) -> tuple[int, int]:
        """(buffer, offset inside it) of chain byte `offset`, 0 <= offset < total. The first
        and last buffers of the chain and of its readable and writable parts, and the one
        before the last, are found without a walk: Linux's requests have their header, data
        and status there (a block request's data ends right before its status buffer)."""
        if not 0 <= offset < self.total:
            raise IndexError(f"byte {offset} is outside chain {self.head}'s {self.total}")
        for k, start in self._ends():
            if start <= offset < start + self.length(k):
                return k, offset - start
        at = 0
        for k, (_, length) in enumerate(IOVEC.iter_unpack(self.iov)):
            if offset < at + length:
                return k, offset - at
            at += length
        raise AssertionError("the lengths add up to total")  # checked above

    def _ends(self) -> tuple[tuple[int, int], ...]:
        """(buffer, its first chain byte) of the buffers locate() finds without a walk."""
        last = self.count - 1
        start_of_last = self.total - self.length(last)
        ends = [(0, 0), (last, start_of_last)]
        if last >= 1:
            ends.append((last - 1, start_of_last - self.length(last - 1)))
        if 0 < self.nr_readable <= last:
            ends += [(self.nr_readable, self.readable_len),
                     (self.nr_readable - 1, self.readable_len - self.length(self.nr_readable - 1))]
        return tuple(ends)

    def iov_range(self, start: int, end: int) -> tuple[bytes, int]:
        """The iovec (and its entry count) for chain bytes [start, end): whole buffers as they
        are, the first and last cut to the range. A range past the chain is an IndexError:
        a device must never hand the kernel more than the driver gave."""
        if not 0 <= start <= end <= self.total:
            raise IndexError(f"bytes [{start}, {end}) are outside chain {self.head}'s {self.total}")
        if start == end:
            return b"", 0
        first, skip = self.locate(start)
        last, upto = self.locate(end - 1)
        iov = bytearray(self.iov[first * ENTRY:(last + 1) * ENTRY])
        if upto + 1 != self.length(last):
            IOVEC.pack_into(iov, len(iov) - ENTRY, IOVEC.unpack_from(iov, len(iov) - ENTRY)[0], upto + 1)
        if skip:
            host, length = IOVEC.unpack_from(iov, 0)
            IOVEC.pack_into(iov, 0, host + skip, length - skip)
        return bytes(iov), last - first + 1

    def read(self, start: int, size: int) -> bytes:
        """Chain bytes [start, start + size), fewer where the chain ends first."""
        if start >= self.total or size <= 0:
            return b""
        k, off = self.locate(start)
        out = bytes(self.view(k)[off:off + size])
        while len(out) < size and (k := k + 1) < self.count:
            out += self.view(k)[:size - len(out)]
        return out

    def write(self, start: int, data: bytes) -> int:
        """Copy `data` to chain bytes from `start` (writable ones) as far as the chain reaches;
        returns the bytes copied."""
        if not data or start >= self.total:
            return 0
        k, off = self.locate(start)
        done = 0
        while done < len(data) and k < self.count:
            buf = self.view(k)[off:]
            n = min(len(buf), len(data) - done)
            buf[:n] = data[done:done + n]
            done, k, off = done + n, k + 1, 0
        return done

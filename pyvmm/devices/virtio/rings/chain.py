"""A descriptor chain as a device sees it: device-readable buffers, then device-writable ones,
as zero-copy views of guest RAM (or, from a linear indirect table, a host struct iovec)."""

from __future__ import annotations

from pyvmm.devices.virtio.rings.buffers import fill, split, split_tail
from pyvmm.devices.virtio.rings.layout import IOVEC
from pyvmm.machine.memory import Region

__all__ = ["Chain", "QueueError", "fill", "split", "split_tail"]


class QueueError(Exception):
    """The driver broke the split-ring rules: the device must be reset."""


class Chain:
    """One available descriptor chain: device-readable buffers, then device-writable ones.

    A chain from a linear indirect table (linear_table.py) also carries `iov`, its
    buffers as a host struct iovec array, and builds the memoryviews only if asked for them."""

    __slots__ = ("head", "_readable", "_writable", "iov", "nr_readable", "total", "_ram")

    def __init__(self, head: int, readable: list[memoryview] | None, writable: list[memoryview] | None,
                 iov: bytes | None = None, nr_readable: int = 0, total: int = 0, ram: Region | None = None) -> None:
        self.head, self._readable, self._writable = head, readable, writable
        self.iov, self.nr_readable, self.total, self._ram = iov, nr_readable, total, ram

    @property
    def readable(self) -> list[memoryview]:
        if self._readable is None:
            self._readable, self._writable = self._views()
        return self._readable

    @property
    def writable(self) -> list[memoryview]:
        if self._writable is None:
            self._readable, self._writable = self._views()
        return self._writable

    def _views(self) -> tuple[list[memoryview], list[memoryview]]:
        assert self.iov is not None
        views = [self.view(k) for k in range(len(self.iov) // IOVEC.size)]
        return views[:self.nr_readable], views[self.nr_readable:]

    def view(self, k: int) -> memoryview:
        """Buffer `k` of an iov chain as a memoryview."""
        assert self.iov is not None and self._ram is not None
        host, length = IOVEC.unpack_from(self.iov, k * IOVEC.size)
        off = host - self._ram.host_addr
        if not 0 <= off <= off + length <= self._ram.size:  # a slice would wrap or clip, not fail
            raise QueueError(f"buffer {k} of chain {self.head} is outside guest RAM")
        return self._ram.view[off:off + length]

    def length(self, k: int) -> int:
        """The length of buffer `k` of an iov chain."""
        assert self.iov is not None
        length: int = IOVEC.unpack_from(self.iov, k * IOVEC.size)[1]
        return length

    @property
    def readable_len(self) -> int:
        return sum(len(b) for b in self.readable)

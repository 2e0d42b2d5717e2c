"""The fast road for indirect tables in the layout drivers use (Linux's virtqueue_add_split):
descriptor k links to k+1, readable buffers first, every buffer inside the first RAM region.

Such a table is checked and turned into a host struct iovec with integer arithmetic on the whole
table at once, not a Python loop per descriptor: under emulation that loop cost ~15 us a
descriptor, most of a 1 MiB block request. Anything else goes the general way (queue.py), which
also names what is wrong with a malformed table.
"""

from __future__ import annotations

from functools import lru_cache

from pyvmm.devices.virtio.rings.chain import Chain
from pyvmm.devices.virtio.rings.layout import DESC_SIZE, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from pyvmm.machine.memory import Region

DESC_BITS = DESC_SIZE * 8
MAX_TABLE = 256  # the longest indirect table any pyvmm queue accepts (its size: virtio-blk, virtio-net)
ENTRY_MODULUS = (1 << DESC_BITS) - 1


class TableConstants:
    """Per-table-size masks for linear_chain: one 16-byte pattern per descriptor,
    laid out like struct virtq_desc (addr bytes 0-7, len 8-11, flags 12-13, next 14-15)."""

    def __init__(self, n: int, gpa: int, size: int, host_addr: int) -> None:
        def every(pattern: bytes, count: int = n) -> int:
            return int.from_bytes(pattern * count, "little")

        zero = bytes(DESC_SIZE)
        self.n = n
        self.addrs = every(b"\xff" * 8 + bytes(8))
        self.lengths = every(b"\xff" * 4 + bytes(12))
        self.write = every(bytes(12) + bytes([VIRTQ_DESC_F_WRITE]) + bytes(3))
        # flags of every entry and next of all but the last (whose next means nothing)
        self.meta = every(bytes(12) + b"\xff" * 4, n - 1) | 0xFFFF << DESC_BITS * (n - 1) + 96
        # ... as a linear table has them, WRITE aside: NEXT and next = k + 1, then a last with no flags
        self.linear = int.from_bytes(b"".join(bytes(12) + bytes([VIRTQ_DESC_F_NEXT, 0]) + (i + 1).to_bytes(2, "little")
                                              for i in range(n - 1)) + zero, "little")
        self.ones = every(b"\x01" + bytes(15))
        self.guards = every(bytes(8) + b"\x02" + bytes(7))  # bit 65 of each entry
        # the RAM region's bounds and host offset, repeated in every entry
        self.starts = gpa * self.ones
        self.ends = (gpa + size) * self.ones | self.guards
        self.to_host = (host_addr - gpa) * self.ones

    def writable_tail(self, count: int) -> int:
        """The WRITE bits of a table whose last `count` entries are writable."""
        shift = DESC_BITS * (self.n - count)
        return self.write >> shift << shift


# A guest chooses its tables' lengths, up to the queue size, and Linux's virtio-blk uses one per
# segment count. So the cache has room for every length a 256-entry queue allows, and no more:
# an entry is ~10 ints of 16 bytes per descriptor, all 256 lengths ~5 MiB, whatever the guest does.
@lru_cache(maxsize=MAX_TABLE)
def _table_constants(n: int, gpa: int, size: int, host_addr: int) -> TableConstants:
    return TableConstants(n, gpa, size, host_addr)


def linear_chain(head: int, raw: memoryview, regions: list[Region]) -> Chain | None:
    """Chain `head` from the indirect table `raw` as a host iovec into the first of guest
    RAM's `regions`; None if the table is not in the linear layout (the general walk then
    follows it)."""
    region = regions[0]
    n = len(raw) // DESC_SIZE
    if n > MAX_TABLE:
        return None  # a device with a larger queue: the general walk, and nothing kept
    k = _table_constants(n, region.gpa, region.size, region.host_addr)
    t = int.from_bytes(raw, "little")  # one copy: the driver cannot change it under us
    meta = t & k.meta
    writes = meta & k.write
    if meta ^ writes != k.linear:
        return None  # not linked 0->1->...->n-1 with only NEXT/WRITE flags
    nr_writable = writes.bit_count()
    if writes != k.writable_tail(nr_writable):
        return None  # a readable buffer after a writable one
    addrs = t & k.addrs
    lengths = (t >> 64) & k.lengths  # each length moved to its entry's low bits
    # Each entry is 128 bits and an address 64, so bit 65 of every entry can serve as a
    # guard: a subtraction that goes negative in one entry clears that entry's guard.
    if ((addrs | k.guards) - k.starts) & k.guards != k.guards:
        return None  # an address below the region
    if (k.ends - (addrs + lengths)) & k.guards != k.guards:
        return None  # a buffer past its end
    iov = (addrs + k.to_host | lengths << 64).to_bytes(len(raw), "little")
    # the sums of the lengths: 2**128 = 1 (mod 2**128 - 1), so the entries add up mod that
    # (exactly: 256 lengths of 32 bits come nowhere near it)
    nr_readable = n - nr_writable
    readable_len = (lengths & (1 << DESC_BITS * nr_readable) - 1) % ENTRY_MODULUS
    total = lengths % ENTRY_MODULUS
    return Chain(head, iov, nr_readable, readable_len, total, regions)

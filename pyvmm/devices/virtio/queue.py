"""Split virtqueues, the device side (virtio 1.2 §2.7), hardened against a hostile driver.

The driver owns the descriptor table and the available ring; pyvmm only reads them, and every
address, length and index it reads is checked: ring and buffer ranges must lie inside guest RAM
(GuestMemory refuses anything else), indices must be below the queue size, a chain may not be
longer than the queue (which also ends descriptor loops), indirect tables must be whole
descriptors and may not nest. Any violation raises QueueError; the transport then marks the
device NEEDS_RESET (§2.1.2) and stops using its queues until the driver resets it.

Buffers come back as zero-copy memoryviews of guest RAM, ready for preadv/pwritev/readv/writev.
Indirect tables in the layout drivers use take a faster road: checked and translated into a host
iovec with arithmetic on the whole table at once (Virtqueue._linear_table), for virtio-blk's
one-syscall requests.
"""

from __future__ import annotations

import struct
from functools import cache

from pyvmm.barrier import fence
from pyvmm.errors import GuestMemoryError
from pyvmm.memory import GuestMemory, Region

# struct virtq_desc: le64 addr, le32 len, le16 flags, le16 next (§2.7.5)
DESC = struct.Struct("<QIHH")
DESC_SIZE = DESC.size
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
# struct virtq_used_elem: le32 id, le32 len (§2.7.8)
USED_ELEM = struct.Struct("<II")
VIRTQ_AVAIL_F_NO_INTERRUPT = 1  # §2.7.7
MAX_QUEUE_SIZE = 32768  # §2.7: a split queue's size is a power of 2, at most 32768
IOVEC = struct.Struct("<QQ")  # struct iovec on LP64: void *iov_base, size_t iov_len
DESC_BITS = DESC_SIZE * 8
ENTRY_MODULUS = (1 << DESC_BITS) - 1


class TableConstants:
    """Per-table-size masks for Virtqueue._linear_table: one 16-byte pattern per descriptor,
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
        self._tails: dict[int, int] = {}
        # the RAM region's bounds and host offset, repeated in every entry
        self.starts = gpa * self.ones
        self.ends = (gpa + size) * self.ones | self.guards
        self.to_host = (host_addr - gpa) * self.ones

    def writable_tail(self, count: int) -> int:
        """The WRITE bits of a table whose last `count` entries are writable."""
        tail = self._tails.get(count)
        if tail is None:
            shift = DESC_BITS * (self.n - count)
            tail = self._tails[count] = self.write >> shift << shift
        return tail


@cache
def _table_constants(n: int, gpa: int, size: int, host_addr: int) -> TableConstants:
    return TableConstants(n, gpa, size, host_addr)


class QueueError(Exception):
    """The driver broke the split-ring rules: the device must be reset."""


class Chain:
    """One available descriptor chain: device-readable buffers, then device-writable ones.

    A chain from a linear indirect table (see Virtqueue._linear_table) also carries `iov`, its
    buffers as a host struct iovec array, and builds the memoryviews only if asked for them."""

    __slots__ = ("head", "_readable", "_writable", "iov", "nr_readable", "total", "_ram")

    def __init__(self, head: int, readable: list[memoryview] | None, writable: list[memoryview] | None,
                 iov: bytes | None = None, nr_readable: int = 0, total: int = 0, ram: Region | None = None) -> None:
        self.head, self._readable, self._writable = head, readable, writable
        self.iov, self.nr_readable, self.total, self._ram = iov, nr_readable, total, ram

    @property
    def readable(self) -> list[memoryview]:
        if self._readable is None:
            self._views()
        return self._readable  # type: ignore[return-value]

    @property
    def writable(self) -> list[memoryview]:
        if self._writable is None:
            self._views()
        return self._writable  # type: ignore[return-value]

    def _views(self) -> None:
        assert self.iov is not None
        views = [self.view(k) for k in range(len(self.iov) // IOVEC.size)]
        self._readable, self._writable = views[:self.nr_readable], views[self.nr_readable:]

    def view(self, k: int) -> memoryview:
        """Buffer `k` of an iov chain as a memoryview."""
        assert self.iov is not None and self._ram is not None
        host, length = IOVEC.unpack_from(self.iov, k * IOVEC.size)
        off = host - self._ram.host_addr
        return self._ram.view[off:off + length]

    def length(self, k: int) -> int:
        """The length of buffer `k` of an iov chain."""
        assert self.iov is not None
        return IOVEC.unpack_from(self.iov, k * IOVEC.size)[1]  # type: ignore[no-any-return]

    @property
    def readable_len(self) -> int:
        return sum(len(b) for b in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(len(b) for b in self.writable)


def split(buffers: list[memoryview], at: int) -> tuple[list[memoryview], list[memoryview]]:
    """Buffers for the first `at` bytes and for the rest (§2.6.4: framing is the driver's
    choice, so a header may span descriptors or share one with data)."""
    head: list[memoryview] = []
    for i, b in enumerate(buffers):
        if at <= 0:
            return head, buffers[i:]
        if len(b) <= at:
            head.append(b)
            at -= len(b)
        else:
            head.append(b[:at])
            return head, [b[at:], *buffers[i + 1:]]
    return head, []


def fill(buffers: list[memoryview], data: bytes) -> int:
    """Copy `data` into the buffers as far as they reach; returns the bytes copied."""
    done = 0
    for b in buffers:
        n = min(len(b), len(data) - done)
        b[:n] = data[done:done + n]
        done += n
        if done == len(data):
            break
    return done


def split_tail(buffers: list[memoryview], size: int) -> tuple[list[memoryview], list[memoryview]]:
    """Buffers for all but the last `size` bytes, and for those last bytes."""
    total = sum(len(b) for b in buffers)
    return split(buffers, max(0, total - size))


class Virtqueue:
    """One split virtqueue. The transport fills in size and ring addresses from the driver's
    register writes, then calls activate(); the device's worker pops chains, pushes used
    elements and publishes them."""

    def __init__(self, index: int, max_size: int, memory: GuestMemory) -> None:
        if not 0 < max_size <= MAX_QUEUE_SIZE or max_size & (max_size - 1):
            raise ValueError(f"queue size {max_size} is not a power of 2 up to {MAX_QUEUE_SIZE}")
        self.index = index
        self.max_size = max_size
        self.memory = memory
        self.reset()

    def reset(self) -> None:
        """Back to the state after a device reset: not ready, registers cleared (§4.2.2)."""
        self.size = self.max_size
        self.desc_addr = self.avail_addr = self.used_addr = 0
        self.ready = False
        self.event_idx = False  # VIRTIO_F_EVENT_IDX negotiated (§2.7.10)
        self.last_avail = 0  # next available-ring slot to take
        self.seen_avail = 0  # the avail index last read (entries below it are safe to read)
        self.used_idx = 0  # next used-ring slot to fill
        self.published = 0  # the used index the driver has seen
        self._desc: memoryview | None = None
        self._avail: memoryview | None = None  # as le16 cells
        self._used: memoryview | None = None  # as bytes
        self._used16: memoryview | None = None  # the same, as le16 cells

    def activate(self, event_idx: bool) -> None:
        """QueueReady=1: check the driver's layout and map the three rings (§2.7, alignment
        and sizes from its table "Virtqueue Part Alignment Size")."""
        size = self.size
        if not 0 < size <= self.max_size or size & (size - 1):
            raise QueueError(f"queue {self.index}: size {size} is not a power of 2 up to {self.max_size}")
        extra = 2 if event_idx else 0
        parts = (("descriptor table", self.desc_addr, 16, DESC_SIZE * size),
                 ("available ring", self.avail_addr, 2, 4 + 2 * size + extra),
                 ("used ring", self.used_addr, 4, 4 + 8 * size + extra))
        views = []
        for name, addr, align, length in parts:
            if addr % align:
                raise QueueError(f"queue {self.index}: {name} at {addr:#x} is not {align}-byte aligned")
            try:
                views.append(self.memory.view(addr, length))
            except GuestMemoryError:
                raise QueueError(f"queue {self.index}: {name} {addr:#x}+{length:#x} is not in guest RAM") from None
        self._desc, avail, self._used = views
        self._avail = avail[:len(avail) & ~1].cast("H")
        self._used16 = self._used[:len(self._used) & ~1].cast("H")
        self.event_idx = event_idx
        self.last_avail = self.seen_avail = self._avail[1]  # a fresh queue starts where the driver is
        self.used_idx = self.published = self._used16[1]
        self.ready = True

    def release(self) -> None:
        """Drop the ring views (before guest RAM is unmapped)."""
        for v in (self._avail, self._used16, self._desc, self._used):
            if v is not None:
                v.release()
        self._desc = self._avail = self._used = self._used16 = None
        self.ready = False

    # --- the available side ----------------------------------------------------------------
    def pending(self) -> bool:
        """Whether the driver has made chains available that are not taken yet."""
        if self.last_avail != self.seen_avail:
            return True
        assert self._avail is not None
        return self._avail[1] != self.last_avail

    def pop(self) -> Chain | None:
        """The next available chain, or None."""
        avail = self._avail
        assert avail is not None
        if self.last_avail == self.seen_avail:
            idx = avail[1]
            if idx == self.last_avail:
                return None
            if (idx - self.last_avail) & 0xFFFF > self.size:
                raise QueueError(f"queue {self.index}: available index jumped from {self.last_avail} to {idx}")
            self.seen_avail = idx
            fence()  # the ring entries and descriptors are read only after the index (§2.7.13)
        head = avail[2 + self.last_avail % self.size]
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        return self._walk(head)

    def unpop(self) -> None:
        """Give back the chain pop() returned last (a device that could not use it yet)."""
        self.last_avail = (self.last_avail - 1) & 0xFFFF

    def _walk(self, head: int) -> Chain:
        """Follow the chain from `head` (§2.7.5, §2.7.5.3). The per-descriptor loop is the
        device's hot path (a 1 MiB block request is up to 256 descriptors), so it works on
        unpacked tuples and slices the first RAM region's view directly; anything else goes
        through the bounds-checked GuestMemory.view."""
        size = self.size
        if head >= size:
            raise QueueError(f"queue {self.index}: chain head {head} is beyond the queue size {size}")
        table = self._desc
        assert table is not None
        unpack = DESC.unpack_from
        region = self.memory.regions[0]
        base, span, ram = region.gpa, region.size, region.view
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        entries: list[tuple[int, int, int, int]] | None = None  # an indirect table, once taken
        limit = size  # descriptors this table may still yield: a longer walk is a loop
        i = head
        while True:
            if limit == 0:
                raise QueueError(f"queue {self.index}: chain from {head} is longer than its table (a loop?)")
            limit -= 1
            addr, length, flags, nxt = unpack(table, i * DESC_SIZE) if entries is None else entries[i]
            if flags & VIRTQ_DESC_F_INDIRECT:
                # one level only, and not chained on (§2.7.5.3.1)
                if entries is not None or flags & VIRTQ_DESC_F_NEXT:
                    raise QueueError(f"queue {self.index}: nested or chained indirect descriptor in chain {head}")
                if length == 0 or length % DESC_SIZE or length // DESC_SIZE > size:
                    raise QueueError(f"queue {self.index}: indirect table of {length} bytes in chain {head}")
                raw = self._view(addr, length, head)
                if not readable and not writable and (chain := self._linear_table(head, raw)) is not None:
                    return chain
                entries = list(DESC.iter_unpack(raw))  # one copy: the driver cannot change it under us
                limit, i = len(entries), 0
                continue
            if length:
                off = addr - base
                buf = ram[off:off + length] if 0 <= off and off + length <= span else self._view(addr, length, head)
                if flags & VIRTQ_DESC_F_WRITE:
                    writable.append(buf)
                elif writable:
                    raise QueueError(f"queue {self.index}: chain {head} has a readable buffer after a writable one")
                else:
                    readable.append(buf)
            if not flags & VIRTQ_DESC_F_NEXT:
                return Chain(head, readable, writable)
            i = nxt
            if i >= (size if entries is None else len(entries)):
                raise QueueError(f"queue {self.index}: descriptor {i} in chain {head} is beyond its table")

    def _linear_table(self, head: int, raw: memoryview) -> Chain | None:
        """An indirect table as drivers lay it out (Linux's virtqueue_add_split): descriptor k
        links to k+1, readable buffers first, every buffer inside the first RAM region. The
        table is checked and turned into a host iovec with integer arithmetic on the whole
        table at once, not a Python loop per descriptor: under emulation that loop cost
        ~15 us a descriptor, most of a 1 MiB block request. None: not that shape; the general
        walk then follows it (and names what is wrong, if anything is)."""
        n = len(raw) // DESC_SIZE
        region = self.memory.regions[0]
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
        # the sum of the lengths: 2**128 = 1 (mod 2**128 - 1), so the entries add up mod that
        total = lengths % ENTRY_MODULUS
        return Chain(head, None, None, iov, n - nr_writable, total, region)

    def _view(self, addr: int, length: int, head: int) -> memoryview:
        try:
            return self.memory.view(addr, length)
        except GuestMemoryError:
            raise QueueError(f"queue {self.index}: buffer {addr:#x}+{length:#x} in chain {head} "
                             "is not in guest RAM") from None

    # --- the used side ---------------------------------------------------------------------
    def push(self, head: int, written: int) -> None:
        """Return chain `head` with `written` bytes written into its writable buffers."""
        assert self._used is not None
        USED_ELEM.pack_into(self._used, 4 + 8 * (self.used_idx % self.size), head, written)
        self.used_idx = (self.used_idx + 1) & 0xFFFF

    def publish(self) -> bool:
        """Make pushed elements visible; True if the driver wants an interrupt for them."""
        used16, avail = self._used16, self._avail
        assert used16 is not None and avail is not None
        new, old = self.used_idx, self.published
        if new == old:
            return False
        fence()  # used elements before the used index (§2.7.8)
        used16[1] = new
        self.published = new
        fence()  # the index store before reading the driver's suppression state (§2.7.10)
        if self.event_idx:
            event = avail[2 + self.size]  # used_event
            return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF  # vring_need_event
        return not avail[0] & VIRTQ_AVAIL_F_NO_INTERRUPT

    def want_notifications(self) -> bool:
        """Before the worker sleeps: ask for a notification when the driver makes the next
        chain available (avail_event, §2.7.10), then True if one already was (no kick would
        come for it)."""
        if self.event_idx:
            assert self._used16 is not None
            self._used16[2 + 4 * self.size] = self.last_avail  # avail_event
            fence()
        return self.pending()

"""Split virtqueues, the device side (virtio 1.2 §2.7), hardened against a hostile driver.

The driver owns the descriptor table and the available ring; pyvmm only reads them, and every
address, length and index it reads is checked: ring and buffer ranges must lie inside guest RAM
(GuestMemory refuses anything else), indices must be below the queue size, a chain may not be
longer than the queue (which also ends descriptor loops), indirect tables must be whole
descriptors and may not nest. Any violation raises QueueError; the transport then marks the
device NEEDS_RESET (§2.1.2) and stops using its queues until the driver resets it.

A chain comes back as one host struct iovec array over guest RAM (chain.py), ready for
preadv/pwritev/readv/writev, with zero-copy memoryviews when a device asks. Indirect tables in
the layout drivers use take a faster road to the same Chain (linear_table.py).
"""

from __future__ import annotations

from pyvmm.devices.virtio.rings.barrier import fence
from pyvmm.devices.virtio.rings.chain import Chain, QueueError, iovec_array
from pyvmm.devices.virtio.rings.layout import (
    DESC,
    DESC_SIZE,
    MAX_QUEUE_SIZE,
    USED_ELEM,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
)
from pyvmm.devices.virtio.rings.linear_table import linear_chain
from pyvmm.errors import GuestMemoryError
from pyvmm.machine.memory import GuestMemory

__all__ = ["Chain", "QueueError", "Virtqueue"]


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
        and sizes from its table "Virtqueue Part Alignment Size"). The sizes include the event
        index fields whether or not VIRTIO_F_EVENT_IDX is negotiated yet, as the table's do: a
        driver may ready a queue before FEATURES_OK, and a kernel vhost back-end, which checks
        ring addresses against nothing but the process's address space, would then reach past
        a ring sized without them."""
        size = self.size
        if not 0 < size <= self.max_size or size & (size - 1):
            raise QueueError(f"queue {self.index}: size {size} is not a power of 2 up to {self.max_size}")
        parts = (("descriptor table", self.desc_addr, 16, DESC_SIZE * size),
                 ("available ring", self.avail_addr, 2, 6 + 2 * size),
                 ("used ring", self.used_addr, 4, 6 + 8 * size))
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
        """Follow the chain from `head` (§2.7.5, §2.7.5.3) into a host iovec. The
        per-descriptor loop is the device's hot path (a 1 MiB block request is up to 256
        descriptors), so it works on unpacked tuples and checks buffers against the first RAM
        region with plain arithmetic; anything else goes through GuestMemory's check."""
        size = self.size
        if head >= size:
            raise QueueError(f"queue {self.index}: chain head {head} is beyond the queue size {size}")
        table = self._desc
        assert table is not None
        unpack = DESC.unpack_from
        regions = self.memory.regions
        entries: list[tuple[int, int, int, int]] | None = None  # an indirect table, once taken
        limit, i = size, head  # descriptors this table may still yield: a longer walk is a loop
        addr, length, flags, _ = unpack(table, head * DESC_SIZE)
        if flags & VIRTQ_DESC_F_INDIRECT:  # as Linux sends every request of more than one buffer
            raw = self._indirect_table(addr, length, flags, head)
            if (chain := linear_chain(head, raw, regions)) is not None:
                return chain
            entries = list(DESC.iter_unpack(raw))  # one copy: the driver cannot change it under us
            limit, i = len(entries), 0
        base, span, host_base = regions[0].gpa, regions[0].size, regions[0].host_addr
        iov: list[int] = []  # base0, len0, base1, len1, ...: struct iovec's fields
        nr_readable = readable_len = total = 0
        while True:
            if limit == 0:
                raise QueueError(f"queue {self.index}: chain from {head} is longer than its table (a loop?)")
            limit -= 1
            addr, length, flags, nxt = unpack(table, i * DESC_SIZE) if entries is None else entries[i]
            if flags & VIRTQ_DESC_F_INDIRECT:  # at the end of a chain of direct descriptors
                if entries is not None:  # one level only (§2.7.5.3.1)
                    raise QueueError(f"queue {self.index}: nested or chained indirect descriptor in chain {head}")
                entries = list(DESC.iter_unpack(self._indirect_table(addr, length, flags, head)))
                limit, i = len(entries), 0
                continue
            if length:
                off = addr - base
                host = host_base + off if 0 <= off and off + length <= span else self._host(addr, length, head)
                if not flags & VIRTQ_DESC_F_WRITE:
                    if total != readable_len:
                        raise QueueError(f"queue {self.index}: chain {head} has a readable buffer after a writable one")
                    nr_readable += 1
                    readable_len += length
                iov += (host, length)
                total += length
            if not flags & VIRTQ_DESC_F_NEXT:
                return Chain(head, iovec_array(len(iov) // 2).pack(*iov), nr_readable, readable_len, total, regions)
            i = nxt
            if i >= (size if entries is None else len(entries)):
                raise QueueError(f"queue {self.index}: descriptor {i} in chain {head} is beyond its table")

    def _indirect_table(self, addr: int, length: int, flags: int, head: int) -> memoryview:
        """The indirect table an indirect descriptor of chain `head` points to: whole
        descriptors, no more than the queue holds, and not chained on (§2.7.5.3.1)."""
        if flags & VIRTQ_DESC_F_NEXT:
            raise QueueError(f"queue {self.index}: nested or chained indirect descriptor in chain {head}")
        if length == 0 or length % DESC_SIZE or length // DESC_SIZE > self.size:
            raise QueueError(f"queue {self.index}: indirect table of {length} bytes in chain {head}")
        ram = self.memory.regions[0]  # first, with plain arithmetic, as _walk checks buffers
        off = addr - ram.gpa
        if 0 <= off and off + length <= ram.size:
            return ram.view[off:off + length]
        return self._view(addr, length, head)

    def _view(self, addr: int, length: int, head: int) -> memoryview:
        try:
            return self.memory.view(addr, length)
        except GuestMemoryError:
            raise QueueError(f"queue {self.index}: buffer {addr:#x}+{length:#x} in chain {head} "
                             "is not in guest RAM") from None

    def _host(self, addr: int, length: int, head: int) -> int:
        """The host address of a buffer outside the first RAM region."""
        try:
            region = self.memory.find(addr, length)
        except GuestMemoryError:
            raise QueueError(f"queue {self.index}: buffer {addr:#x}+{length:#x} in chain {head} "
                             "is not in guest RAM") from None
        return region.host_addr + addr - region.gpa

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

"""Every virtio device against a hostile driver (hypothesis): random descriptor tables, indirect
tables, available rings and request bytes, kicked while the device's worker is still busy with
the last ones, mixed with random register writes at any width. Whatever it is fed, no exception
escapes a thread, nothing hangs (after each example the driver resets the device and a
well-formed request must complete), and the VMM's memory stays bounded.

The rings are the device's own, in guest RAM (tests/unit/virtio_driver.py); the workers are the
real ones. `make test` runs a share of the campaign, `make fuzz` all of it (tests/fuzzing.py).
"""

from __future__ import annotations

import logging
import random
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvmm.devices.virtio import mmio_registers as reg
from pyvmm.devices.virtio import net as virtio_net
from pyvmm.devices.virtio.blk import SECTOR, VIRTIO_BLK_T_GET_ID, VirtioBlk
from pyvmm.devices.virtio.console import VirtioConsole
from pyvmm.devices.virtio.device import VirtioDevice
from pyvmm.devices.virtio.net import parse_network
from pyvmm.devices.virtio.p9 import Virtio9p
from pyvmm.devices.virtio.rings.chain import Chain, QueueError
from pyvmm.devices.virtio.rings.layout import DESC, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from pyvmm.devices.virtio.rings.queue import Virtqueue
from pyvmm.devices.virtio.rng import VirtioRng
from tests import fuzzing
from tests.unit.virtio_driver import RAM, RAM_SIZE, Driver, FakeVm

QUEUE = 16  # the driver's queue size: the fuzzed tables fill it
# hypothesis runs of EXAMPLES each (its own memory is freed between them): `make test` makes two,
# the campaign as many as it takes to walk CHAINS_TARGET chains and make as many register writes
ROUNDS, MAX_ROUNDS = fuzzing.size(2, 20), fuzzing.size(2, 400)
EXAMPLES = fuzzing.size(60, 100)
BURST = 40  # at most this many seeded batches after an example's own
CHAINS_TARGET = 100_000  # chains walked, and register writes, per device in the campaign
RSS_BOUND_MIB = 32  # growth allowed after the first round (the allocator's high-water mark settles)
RSS_STEADY_MIB = 4  # growth allowed over the campaign's second half: none to speak of
HEAP = RAM + 0x10_0000  # where the driver's buffers live, and the fuzzed bytes go
TABLES = RAM + 0x30_0000  # the fuzzed indirect tables

# mostly plausible values, so that chains get far into the devices, and every kind of wrong one
address = st.one_of(st.integers(HEAP, HEAP + 0x1_0000), st.integers(HEAP, HEAP + 0x1_0000), st.integers(RAM, RAM + RAM_SIZE),
                    st.integers(RAM - 64, RAM + 64), st.integers(RAM + RAM_SIZE - 64, RAM + RAM_SIZE + 64),
                    st.integers(TABLES, TABLES + 0x100).map(lambda a: a & ~15), st.integers(0, 2**64 - 1))
length = st.one_of(st.integers(0, 64), st.integers(0, 64), st.integers(0, 0x1_0000), st.integers(0, 2**32 - 1),
                   st.sampled_from([16, 32, 16 * QUEUE, 16 * 257]))
flags = st.one_of(st.integers(0, 7), st.integers(0, 7), st.integers(0, 0xFFFF))
in_queue = st.integers(0, QUEUE - 1)
index = st.one_of(in_queue, in_queue, in_queue, st.integers(0, 0xFFFF))  # a descriptor or ring entry
hostile = st.tuples(address, length, flags, index)
# a descriptor a driver could have written (a buffer in RAM, NEXT and WRITE as it likes): with
# these most chains are well-formed enough to reach the device's request handling
plausible = st.tuples(st.integers(HEAP, HEAP + 0x8000), st.integers(1, 256), st.integers(0, 3), in_queue)
descriptor = st.one_of(plausible, plausible, plausible, plausible, plausible, plausible, hostile)  # ~2 hostile per table


class Ring(NamedTuple):
    """One batch: a whole descriptor table, an indirect table, bytes in the buffers, ring entries."""

    queue: int
    table: list[tuple[int, int, int, int]]
    indirect: list[tuple[int, int, int, int]]
    data: bytes
    heads: list[int]
    stray: tuple[int, int] | None  # (k, head): ring entry k names no descriptor of the queue
    idx_jump: int  # 0: advance the available index by len(heads); else by this much (hostile)


class RegisterWrite(NamedTuple):
    offset: int
    size: int
    value: int


class RegisterWrites(NamedTuple):
    """A sequence of writes to any register at any width (a read follows each)."""

    writes: list[RegisterWrite]


ring = st.builds(Ring, st.integers(0, 2), st.lists(descriptor, min_size=QUEUE, max_size=QUEUE),
                 st.lists(descriptor, max_size=8), st.binary(max_size=96),
                 st.lists(in_queue, min_size=QUEUE // 2, max_size=QUEUE),
                 st.none() | st.none() | st.none() | st.tuples(in_queue, st.integers(QUEUE, 0xFFFF)),
                 st.just(0) | st.just(0) | st.just(0) | st.integers(1, 0xFFFF))
register_write = st.builds(RegisterWrite, st.integers(0, 0x1FF).map(lambda o: o & ~3) | st.integers(0, 0x1FF),
                           st.sampled_from([1, 2, 4, 8]), st.integers(0, 2**32 - 1))
register_writes = st.builds(RegisterWrites, st.lists(register_write, min_size=1, max_size=40))
actions = st.lists(ring | register_writes, min_size=2, max_size=10)


def seeded_actions(seed: int, hostility: float, count: int) -> Iterator[Ring | RegisterWrites]:
    """`count` batches, each followed now and then by register writes, from one hypothesis-drawn
    seed: the bulk of the campaign, at the speed of random.Random rather than of hypothesis
    drawing every field. A batch's table holds chains as a driver lays them out (consecutive
    descriptors, readable ones first), and each field of it, each ring entry and the available
    index is then made hostile with probability `hostility` (also drawn)."""
    rnd = random.Random(seed)

    def spoil(value: int, bits: int) -> int:
        return rnd.getrandbits(bits) if rnd.random() < hostility else value

    for _ in range(count):
        table: list[tuple[int, int, int, int]] = []
        heads: list[int] = []
        while len(table) < QUEUE:
            n = min(rnd.randrange(1, 5), QUEUE - len(table))
            readable = rnd.randrange(n + 1)
            heads.append(len(table))
            for k in range(n):
                flags = (VIRTQ_DESC_F_WRITE if k >= readable else 0) | (VIRTQ_DESC_F_NEXT if k + 1 < n else 0)
                table.append((rnd.randrange(HEAP, HEAP + 0x8000), rnd.randrange(1, 257), flags, len(table) + 1))
        table = [(spoil(a, 64), spoil(ln, 32), spoil(f, 16), spoil(nx, 16)) for a, ln, f, nx in table]
        heads = [spoil(h, 16) for h in heads]
        yield Ring(rnd.randrange(3), table, [], rnd.randbytes(rnd.randrange(97)), heads, None,
                   rnd.randrange(1, 0x10000) if rnd.random() < hostility / 4 else 0)
        if rnd.random() < 0.5:
            yield RegisterWrites([RegisterWrite(rnd.randrange(0x200), rnd.choice((1, 2, 4, 8)), rnd.getrandbits(32))
                                  for _ in range(rnd.randrange(1, 41))])


class Target(NamedTuple):
    device: VirtioDevice
    request: Callable[[Driver], None]  # one well-formed request, completed: the device is alive
    close: Callable[[], None]
    waiting: frozenset[int] = frozenset()  # queues whose buffers wait for the host (receive queues)


def blk(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Target:
    disk = tmp / "disk.img"
    disk.write_bytes(bytes(64 * SECTOR))

    def request(d: Driver) -> None:
        d.queues[0].add([struct.pack("<IIQ", VIRTIO_BLK_T_GET_ID, 0, 0)], [20, 1])
        d.queues[0].kick()
        d.queues[0].wait_used()
    return Target(VirtioBlk(str(disk)), request, lambda: None)


def rng(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Target:
    def request(d: Driver) -> None:
        d.queues[0].add([], [64])
        d.queues[0].kick()
        d.queues[0].wait_used()
    return Target(VirtioRng(), request, lambda: None)


def console(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Target:
    def request(d: Driver) -> None:
        d.queues[1].add([b"alive\n"], [])
        d.queues[1].kick()
        d.queues[1].wait_used()
    return Target(VirtioConsole(lambda data: None), request, lambda: None, frozenset({0}))


def net(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Target:
    host, guest_side = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    guest_side.setblocking(False)
    host.setblocking(False)
    # a datagram socket stands in for the tap
    monkeypatch.setattr(virtio_net, "open_tap", lambda name, vnet_hdr_size: guest_side.detach())
    dev = virtio_net.VirtioNet(parse_network("mode=tap,tapif=fuzz0"))

    def request(d: Driver) -> None:
        try:
            while host.recv(65536):  # what the fuzzed transmits sent
                pass
        except BlockingIOError:
            pass
        d.queues[1].add([bytes(12) + b"alive"], [])
        d.queues[1].kick()
        d.queues[1].wait_used()
    return Target(dev, request, host.close, frozenset({0}))


def ninep(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Target:
    share = tmp / "share"
    share.mkdir(exist_ok=True)
    (share / "file").write_bytes(b"x" * 100)

    def request(d: Driver) -> None:
        version = struct.pack("<IBHIH", 21, 100, 0xFFFF, 8192, 8) + b"9P2000.L"  # Tversion
        d.queues[0].add([version], [64])
        d.queues[0].kick()
        d.queues[0].wait_used()
    return Target(Virtio9p(str(share), "fuzz"), request, lambda: None)


DEVICES = {"virtio-blk": blk, "virtio-rng": rng, "virtio-console": console, "virtio-net": net,
           "virtio-9p": ninep}


@pytest.fixture
def escaped() -> Iterator[list[BaseException]]:
    """Exceptions that end any thread (a device worker's would): there must be none."""
    seen: list[BaseException] = []
    previous = threading.excepthook
    threading.excepthook = lambda args: seen.append(args.exc_value or RuntimeError(str(args.exc_type)))
    yield seen
    threading.excepthook = previous


def write_registers(d: Driver, action: RegisterWrites) -> None:
    for w in action.writes:
        d.t.write(w.offset, w.size, w.value & ((1 << 8 * w.size) - 1))
        d.t.read(w.offset, w.size)


def post(d: Driver, action: Ring, waiting: frozenset[int]) -> None:
    """Post one batch on a freshly reset device and kick it; unless the queue waits for the
    host, wait until the device has taken every chain or given up (DEVICE_NEEDS_RESET)."""
    d.init(queue_size=QUEUE)
    q = d.queues[action.queue % len(d.queues)]
    mem = d.mem
    for i, desc in enumerate(action.table):
        mem.write(q.desc + 16 * i, DESC.pack(*desc))
    for i, desc in enumerate(action.indirect):
        mem.write(TABLES + 16 * i, DESC.pack(*desc))
    mem.write(HEAP, action.data)
    heads = list(action.heads)
    if action.stray is not None and action.stray[0] < len(heads):
        heads[action.stray[0]] = action.stray[1]
    for k, head in enumerate(heads):
        mem.write(q.avail + 4 + 2 * (k % QUEUE), struct.pack("<H", head))
    n = (action.idx_jump or len(action.heads)) & 0xFFFF
    mem.write(q.avail + 2, struct.pack("<H", n))
    q.kick()
    if q.index in waiting:
        return
    device_side = d.t.queues[q.index]
    deadline = time.monotonic() + 10
    while device_side.last_avail != n and not d.t.read(reg.STATUS, 4) & reg.DEVICE_NEEDS_RESET:
        assert time.monotonic() < deadline, "the device neither took the chains nor gave up: it hangs"
        time.sleep(0.0005)


@pytest.mark.fuzz
@pytest.mark.parametrize("name", list(DEVICES))
def test_a_hostile_driver_breaks_no_device(name: str, tmp_path: Path, escaped: list[BaseException],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # each broken device logs why: kept out of the captured log, which would hold every line
    monkeypatch.setattr(logging.getLogger("pyvmm"), "level", logging.ERROR)
    t = fuzzing.tally(name)
    real_pop = Virtqueue.pop

    def counted_pop(queue: Virtqueue) -> Chain | None:
        """Every chain a device walks: taken, or refused (QueueError breaks the device)."""
        try:
            chain = real_pop(queue)
        except QueueError:
            t.add("chains walked")
            raise
        if chain is not None:
            t.add("chains walked")
        return chain

    monkeypatch.setattr(Virtqueue, "pop", counted_pop)
    target = DEVICES[name](tmp_path, monkeypatch)
    vm = FakeVm()
    transport = vm.attach(target.device)
    d = Driver(transport, vm.memory)
    examples = 0

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(batch=actions, indirect_table=st.booleans(), seed=st.integers(0, 2**64 - 1),
           hostility=st.floats(0.0005, 0.02) | st.floats(0.02, 0.3), burst=st.integers(0, BURST))
    def example(batch: list[Ring | RegisterWrites], indirect_table: bool, seed: int, hostility: float,
                burst: int) -> None:
        nonlocal examples
        d.init(queue_size=QUEUE)
        if indirect_table:  # entry 0 of each table points at the fuzzed indirect table
            batch = [a._replace(table=[(TABLES, 16 * max(1, len(a.indirect)), VIRTQ_DESC_F_INDIRECT, 0),
                                       *a.table[1:]]) if isinstance(a, Ring) else a for a in batch]
        for action in [*batch, *seeded_actions(seed, hostility, burst)]:
            if isinstance(action, Ring):
                post(d, action, target.waiting)
                t.add("chains posted", len(action.heads))
            else:
                write_registers(d, action)
                t.add("register writes", len(action.writes))
        d.init(queue_size=QUEUE)  # a reset, whatever state the device is in, and it works again
        d.heap = HEAP + 0x2_0000
        target.request(d)
        t.add("good requests after it")
        assert not escaped, escaped
        examples += 1

    # RSS between rounds, once hypothesis has let go of its examples: what pyvmm holds on to
    rss: list[int] = []

    def short_of_target() -> bool:
        walked = t.counts.get("chains walked", 0) - t.counts.get("good requests after it", 0)
        return min(walked, t.counts.get("register writes", 0)) < CHAINS_TARGET

    try:
        while len(rss) < ROUNDS or (fuzzing.CAMPAIGN and short_of_target() and len(rss) < MAX_ROUNDS):
            example()
            rss.append(fuzzing.rss_kib())
    finally:
        vm.close()
        target.close()
    growth, steady = (max(rss) - rss[0]) / 1024, (rss[-1] - rss[len(rss) // 2]) / 1024
    t.notes.append(f"RSS {rss[0] / 1024:.1f} MiB after round 1, at most {max(rss) / 1024:.1f} MiB over {len(rss)} "
                   f"rounds ({examples:,} examples)" + (f", {steady:+.1f} MiB over the second half" if len(rss) > 2 else ""))
    assert not escaped, escaped
    assert growth < RSS_BOUND_MIB, f"the VMM grew by {growth:.1f} MiB: {rss}"
    if fuzzing.CAMPAIGN:
        assert steady < RSS_STEADY_MIB, f"the VMM kept growing: {rss}"
    if fuzzing.CAMPAIGN:
        assert not short_of_target(), t.counts

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
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvmm.devices.virtio import net as virtio_net
from pyvmm.devices.virtio.blk import SECTOR, VIRTIO_BLK_T_GET_ID, VirtioBlk
from pyvmm.devices.virtio.console import VirtioConsole
from pyvmm.devices.virtio.device import VirtioDevice
from pyvmm.devices.virtio.layout import DESC, VIRTQ_DESC_F_INDIRECT
from pyvmm.devices.virtio.net import parse_network
from pyvmm.devices.virtio.rng import VirtioRng
from tests import fuzzing
from tests.unit.virtio_driver import RAM, RAM_SIZE, Driver, FakeVm

QUEUE = 16  # the driver's queue size: the fuzzed tables fill it
ROUNDS = fuzzing.size(2, 35)  # hypothesis runs of EXAMPLES each: its own memory is freed between them
EXAMPLES = fuzzing.size(60, 100)
CHAINS_TARGET = 100_000  # per device, in the campaign
RSS_BOUND_MIB = 32  # growth allowed after the first round (the allocator's high-water mark settles)
RSS_STEADY_MIB = 4  # growth allowed over the campaign's second half: none to speak of
HEAP = RAM + 0x10_0000  # where the driver's buffers live, and the fuzzed bytes go
TABLES = RAM + 0x30_0000  # the fuzzed indirect tables

address = st.one_of(st.integers(HEAP, HEAP + 0x1_0000), st.integers(RAM, RAM + RAM_SIZE),
                    st.integers(RAM - 64, RAM + 64), st.integers(RAM + RAM_SIZE - 64, RAM + RAM_SIZE + 64),
                    st.integers(TABLES, TABLES + 0x100).map(lambda a: a & ~15), st.integers(0, 2**64 - 1))
length = st.one_of(st.integers(0, 64), st.integers(0, 0x1_0000), st.integers(0, 2**32 - 1),
                   st.sampled_from([16, 32, 16 * QUEUE, 16 * 257]))
flags = st.one_of(st.integers(0, 7), st.integers(0, 0xFFFF))
descriptor = st.tuples(address, length, flags, st.integers(0, QUEUE - 1) | st.integers(0, 0xFFFF))


class Ring(NamedTuple):
    """One batch: a whole descriptor table, an indirect table, bytes in the buffers, ring entries."""

    queue: int
    table: list[tuple[int, int, int, int]]
    indirect: list[tuple[int, int, int, int]]
    data: bytes
    heads: list[int]
    idx_jump: int  # 0: advance the available index by len(heads); else by this much (hostile)


class RegisterWrite(NamedTuple):
    offset: int
    size: int
    value: int


ring = st.builds(Ring, st.integers(0, 2), st.lists(descriptor, min_size=QUEUE, max_size=QUEUE),
                 st.lists(descriptor, max_size=8), st.binary(max_size=96),
                 st.lists(st.integers(0, QUEUE - 1) | st.integers(0, 0xFFFF), min_size=QUEUE // 2, max_size=QUEUE),
                 st.just(0) | st.integers(1, 0xFFFF))
register_write = st.builds(RegisterWrite, st.integers(0, 0x1FF).map(lambda o: o & ~3) | st.integers(0, 0x1FF),
                           st.sampled_from([1, 2, 4, 8]), st.integers(0, 2**32 - 1))
actions = st.lists(ring | register_write, min_size=2, max_size=10)


class Target(NamedTuple):
    device: VirtioDevice
    request: Callable[[Driver], None]  # one well-formed request, completed: the device is alive
    close: Callable[[], None]


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
    return Target(VirtioConsole(lambda data: None), request, lambda: None)


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
    return Target(dev, request, host.close)


DEVICES = {"virtio-blk": blk, "virtio-rng": rng, "virtio-console": console, "virtio-net": net}


@pytest.fixture
def escaped() -> Iterator[list[BaseException]]:
    """Exceptions that end any thread (a device worker's would): there must be none."""
    seen: list[BaseException] = []
    previous = threading.excepthook
    threading.excepthook = lambda args: seen.append(args.exc_value or RuntimeError(str(args.exc_type)))
    yield seen
    threading.excepthook = previous


def feed(d: Driver, action: Ring | RegisterWrite, avail_idx: list[int]) -> int:
    """Apply one action through the device's registers and rings; returns the chains posted."""
    if isinstance(action, RegisterWrite):
        d.t.write(action.offset, action.size, action.value & ((1 << 8 * action.size) - 1))
        return 0
    queues = d.queues
    q = queues[action.queue % len(queues)]
    mem = d.mem
    for i, desc in enumerate(action.table):
        mem.write(q.desc + 16 * i, DESC.pack(*desc))
    for i, desc in enumerate(action.indirect):
        mem.write(TABLES + 16 * i, DESC.pack(*desc))
    mem.write(HEAP, action.data)
    n = avail_idx[q.index]
    for k, head in enumerate(action.heads):
        mem.write(q.avail + 4 + 2 * ((n + k) % QUEUE), struct.pack("<H", head))
    n = (n + (action.idx_jump or len(action.heads))) & 0xFFFF
    avail_idx[q.index] = n
    mem.write(q.avail + 2, struct.pack("<H", n))
    q.kick()
    return len(action.heads)


@pytest.mark.fuzz
@pytest.mark.parametrize("name", list(DEVICES))
def test_a_hostile_driver_breaks_no_device(name: str, tmp_path: Path, escaped: list[BaseException],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # each broken device logs why: kept out of the captured log, which would hold every line
    monkeypatch.setattr(logging.getLogger("pyvmm"), "level", logging.ERROR)
    target = DEVICES[name](tmp_path, monkeypatch)
    vm = FakeVm()
    transport = vm.attach(target.device)
    d = Driver(transport, vm.memory)
    t = fuzzing.tally(name)
    examples = 0

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(batch=actions, indirect_table=st.booleans())
    def example(batch: list[Ring | RegisterWrite], indirect_table: bool) -> None:
        nonlocal examples
        d.init(queue_size=QUEUE)
        avail_idx = [0] * len(d.queues)
        if indirect_table:  # entry 0 of each table points at the fuzzed indirect table
            batch = [a._replace(table=[(TABLES, 16 * max(1, len(a.indirect)), VIRTQ_DESC_F_INDIRECT, 0),
                                       *a.table[1:]]) if isinstance(a, Ring) else a for a in batch]
        for action in batch:
            chains = feed(d, action, avail_idx)
            t.add("hostile chains", chains)
            t.add("register writes", isinstance(action, RegisterWrite))
        d.init(queue_size=QUEUE)  # a reset, whatever state the device is in, and it works again
        d.heap = HEAP + 0x2_0000
        target.request(d)
        assert not escaped, escaped
        examples += 1

    # RSS between rounds, once hypothesis has let go of its examples: what pyvmm holds on to
    rss: list[int] = []
    try:
        for _ in range(ROUNDS):
            example()
            rss.append(fuzzing.rss_kib())
    finally:
        vm.close()
        target.close()
    growth, steady = (max(rss) - rss[0]) / 1024, (rss[-1] - rss[len(rss) // 2]) / 1024
    t.notes.append(f"RSS {rss[0] / 1024:.1f} MiB after round 1, at most {max(rss) / 1024:.1f} MiB over {ROUNDS} rounds "
                   f"({examples:,} examples)" + (f", {steady:+.1f} MiB over the second half" if ROUNDS > 2 else ""))
    assert not escaped, escaped
    assert growth < RSS_BOUND_MIB, f"the VMM grew by {growth:.1f} MiB: {rss}"
    if fuzzing.CAMPAIGN:
        assert steady < RSS_STEADY_MIB, f"the VMM kept growing: {rss}"
    if fuzzing.CAMPAIGN:
        assert t.counts["hostile chains"] >= CHAINS_TARGET, t.counts

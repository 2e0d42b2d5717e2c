"""virtio-mmio transport, split virtqueues and the devices, driven through their registers and
rings by a test driver (no KVM: guest RAM is anonymous memory, the worker threads are real)."""

from __future__ import annotations

import argparse
import errno
import os
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from devicetree.builder import Phandles
from kvm_bindings import ffi
from pyvmm.devices.virtio import mmio_registers as reg
from pyvmm.devices.virtio.blk import (
    SECTOR,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    DiskSpec,
    VirtioBlk,
    parse_disk,
)
from pyvmm.devices.virtio.console import VirtioConsole
from pyvmm.devices.virtio.device import VIRTIO_F_VERSION_1
from pyvmm.devices.virtio.net import VirtioNet, parse_network
from pyvmm.devices.virtio.rings.buffers import split
from pyvmm.devices.virtio.rings.chain import Chain, QueueError
from pyvmm.devices.virtio.rings.layout import DESC, IOVEC, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from pyvmm.devices.virtio.rings.queue import Virtqueue
from pyvmm.devices.virtio.rng import VirtioRng
from pyvmm.devices.virtio.vhost_net import VhostNet
from pyvmm.errors import VmmError
from pyvmm.machine.irq_lines import IrqFd
from pyvmm.machine.memory import GuestMemory
from tests import fuzzing
from tests.unit.virtio_driver import RAM, RAM_SIZE, Driver, FakeVm


@pytest.fixture
def vm() -> Iterator[FakeVm]:
    fake = FakeVm()
    yield fake
    fake.close()


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(b"".join(bytes([i]) * SECTOR for i in range(64)))
    return path


def blk_request(kind: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", kind, 0, sector)


# --- transport -----------------------------------------------------------------------------
def test_registers_identify_a_version_2_device_and_its_features(vm: FakeVm, disk: Path) -> None:
    t = vm.attach(VirtioBlk(str(disk)))
    d = Driver(t, vm.memory)
    assert d.read(reg.MAGIC_VALUE) == 0x74726976 and d.read(reg.VERSION_REG) == 2
    assert d.read(reg.DEVICE_ID) == 2
    assert d.features() & VIRTIO_F_VERSION_1
    assert d.read(reg.SHM_LEN_LOW) == 0xFFFF_FFFF  # no shared memory regions
    assert d.read(reg.MAGIC_VALUE, 2) == 0  # registers are 32-bit only
    assert d.read(reg.CONFIG, 8) == 64  # capacity in sectors
    # one ioeventfd per queue on QueueNotify with the queue index as datamatch, one that takes the
    # ACK of used buffers in KVM; an irqfd on the SPI
    assert vm.fd.ioeventfds == [(reg.VIRTIO_MMIO_BASE + reg.QUEUE_NOTIFY, 4, t._kick_fds[0], 1, 0),
                                (reg.VIRTIO_MMIO_BASE + reg.INTERRUPT_ACK, 4, t._ack_fd, 1, reg.INT_USED_BUFFER)]
    assert d.read(reg.INTERRUPT_STATUS) == reg.INT_USED_BUFFER  # reads as set: its ACK never reaches pyvmm
    assert isinstance(t.irq, IrqFd)
    assert vm.fd.irqfds == [(t.irq.fd, 0)]
    node = t.dt_node(Phandles())
    assert node.name == "virtio@3000000" and node.props["compatible"] == "virtio,mmio"
    assert node.props["interrupts"] == [0, 0, 1] and node.props["dma-coherent"] is True


def test_features_without_version_1_are_refused(vm: FakeVm, disk: Path) -> None:
    d = Driver(vm.attach(VirtioBlk(str(disk))), vm.memory)
    d.write(reg.STATUS, reg.ACKNOWLEDGE | reg.DRIVER)
    d.write(reg.DRIVER_FEATURES_SEL, 0)
    d.write(reg.DRIVER_FEATURES, 0)
    d.write(reg.STATUS, reg.ACKNOWLEDGE | reg.DRIVER | reg.FEATURES_OK)
    assert not d.read(reg.STATUS) & reg.FEATURES_OK  # legacy drivers are not served


def test_driver_ok_without_features_ok_breaks_the_device(vm: FakeVm, disk: Path) -> None:
    d = Driver(vm.attach(VirtioBlk(str(disk))), vm.memory)
    d.write(reg.STATUS, reg.ACKNOWLEDGE | reg.DRIVER | reg.DRIVER_OK)
    assert d.read(reg.STATUS) & reg.DEVICE_NEEDS_RESET
    assert d.interrupted() == reg.INT_CONFIG_CHANGE | reg.INT_USED_BUFFER
    assert d.read(reg.INTERRUPT_STATUS) == reg.INT_USED_BUFFER  # the ACK took the configuration change
    d.write(reg.STATUS, 0)
    assert d.read(reg.STATUS) == 0


def test_kicks_are_served_without_reading_the_eventfd_and_survive_a_restart(vm: FakeVm, disk: Path) -> None:
    """Kicks are edge-triggered events: the worker serves them without reading the kick eventfd
    back (a system call per request), and an edge the worker took as it stopped is served by
    the next one."""
    t = vm.attach(VirtioBlk(str(disk)))
    d = Driver(t, vm.memory)
    d.init()
    q = d.queues[0]
    head = q.add([blk_request(VIRTIO_BLK_T_IN, 1)], [SECTOR, 1])
    q.kick()
    assert q.wait_used() == [(head, SECTOR + 1)]
    assert os.eventfd_read(t.kick_fd(0)) >= 1  # still counted: nobody read it
    assert t.stop(time.monotonic() + 5.0)
    head = q.add([blk_request(VIRTIO_BLK_T_IN, 2)], [SECTOR, 1])
    q.kick()
    assert t._poller.poll(0)  # the kick's edge, taken as if by the worker on its way out
    t.start()
    assert q.wait_used() == [(head, SECTOR + 1)]


# --- block ---------------------------------------------------------------------------------
@pytest.mark.parametrize("indirect", [False, True])
def test_block_read_write_flush_and_id(vm: FakeVm, disk: Path, indirect: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    blk = VirtioBlk(str(disk))
    d = Driver(vm.attach(blk), vm.memory)
    d.init()
    q = d.queues[0]
    q.add([blk_request(VIRTIO_BLK_T_IN, 5)], [2 * SECTOR, 1], indirect=indirect)
    q.kick()
    (head, written), = q.wait_used()
    assert written == 2 * SECTOR + 1
    assert d.interrupted() & reg.INT_USED_BUFFER
    q.add([blk_request(VIRTIO_BLK_T_OUT, 1), b"\xAA" * SECTOR], [1], indirect=indirect)
    q.add([blk_request(VIRTIO_BLK_T_FLUSH)], [1], indirect=indirect)
    q.add([blk_request(VIRTIO_BLK_T_GET_ID)], [20, 1], indirect=indirect)
    q.add([blk_request(99)], [1], indirect=indirect)
    q.kick()
    used = q.wait_used(4)
    assert [n for _, n in used] == [1, 1, 21, 1]
    assert disk.read_bytes()[SECTOR:2 * SECTOR] == b"\xAA" * SECTOR
    assert blk.flushes == 1 and synced == [blk.fd]  # FLUSH is an fsync of the image
    statuses = _statuses(d, [(SECTOR, 1), (0, 1), (20, 1), (0, 1)], start=2 * SECTOR + 1)
    assert statuses == [VIRTIO_BLK_S_OK, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP]


def _statuses(d: Driver, sizes: list[tuple[int, int]], start: int) -> list[int]:
    """Status bytes of the requests made after the first read, found by walking the heap in
    the order the driver allocated them (readable buffers, then writable ones)."""
    out = []
    for q in d.queues:
        for i in range(q.free):
            addr, length, flags, _ = DESC.unpack(d.mem.read(q.desc + 16 * i, 16))
            if flags & VIRTQ_DESC_F_INDIRECT:
                for k in range(length // 16):
                    a, n, f, _ = DESC.unpack(d.mem.read(addr + 16 * k, 16))
                    if f & VIRTQ_DESC_F_WRITE and n == 1:
                        out.append(d.mem.read(a, 1)[0])
            elif flags & VIRTQ_DESC_F_WRITE and length == 1:
                out.append(d.mem.read(addr, 1)[0])
    return out[1:]


def test_block_read_lands_in_guest_memory_and_header_may_span_descriptors(vm: FakeVm, disk: Path) -> None:
    d = Driver(vm.attach(VirtioBlk(str(disk))), vm.memory)
    d.init()
    q = d.queues[0]
    header = blk_request(VIRTIO_BLK_T_IN, 7)
    q.add([header[:3], header[3:]], [SECTOR + 1])  # §2.6.4: framing is the driver's choice
    q.kick()
    assert q.wait_used() == [(0, SECTOR + 1)]
    data_addr = d.heap - ((SECTOR + 1 + 15) & ~15)
    assert d.mem.read(data_addr, SECTOR) == bytes([7]) * SECTOR
    assert d.mem.read(data_addr + SECTOR, 1)[0] == VIRTIO_BLK_S_OK


def test_read_only_disk_and_out_of_range_requests_fail_with_ioerr(vm: FakeVm, disk: Path) -> None:
    before = disk.read_bytes()
    blk = VirtioBlk(str(disk), read_only=True)
    d = Driver(vm.attach(blk), vm.memory)
    assert d.features() & (1 << 5)  # VIRTIO_BLK_F_RO
    d.init()
    q = d.queues[0]
    q.add([blk_request(VIRTIO_BLK_T_OUT, 0), b"x" * SECTOR], [1])
    q.add([blk_request(VIRTIO_BLK_T_IN, 63)], [2 * SECTOR, 1])  # runs past the end
    q.add([blk_request(VIRTIO_BLK_T_IN, 0)], [100, 1])  # not whole sectors
    q.kick()
    q.wait_used(3)
    assert _all_status_bytes(d) == [VIRTIO_BLK_S_IOERR] * 3
    assert disk.read_bytes() == before


def _all_status_bytes(d: Driver) -> list[int]:
    q = d.queues[0]
    out = []
    for i in range(q.free):
        addr, length, flags, _ = DESC.unpack(d.mem.read(q.desc + 16 * i, 16))
        if flags & VIRTQ_DESC_F_WRITE and not flags & VIRTQ_DESC_F_NEXT:
            out.append(d.mem.read(addr + length - 1, 1)[0])
    return out


def test_disk_arguments(tmp_path: Path) -> None:
    assert parse_disk("a.img") == DiskSpec("a.img", False, True, "python")
    assert parse_disk("a.img,ro") == DiskSpec("a.img", True, True)
    assert parse_disk("a.img,ro,nolock") == DiskSpec("a.img", True, False)
    assert parse_disk("a.img,backend=qsd,ro") == DiskSpec("a.img", True, True, "qsd")
    assert parse_disk("a.img,backend=python") == DiskSpec("a.img", backend="python")
    for bad in ("rw", "backend=kvmtool", "backend="):
        with pytest.raises(VmmError, match=f"unknown option '{bad}' \\(FILE\\[,ro\\]\\[,nolock\\]\\[,backend=python"):
            parse_disk(f"a.img,{bad}")
    with pytest.raises(VmmError, match="No such file"):
        VirtioBlk(str(tmp_path / "missing.img"))
    (tmp_path / "tiny.img").write_bytes(b"x")
    with pytest.raises(VmmError, match="smaller than one 512-byte sector"):
        VirtioBlk(str(tmp_path / "tiny.img"))


def test_a_writable_image_is_synced_when_let_go(disk: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    monkeypatch.setattr(os, "fsync", synced.append)
    rw, ro = VirtioBlk(str(disk), lock=False), VirtioBlk(str(disk), read_only=True, lock=False)
    fds = [rw.fd, ro.fd]
    rw.close()
    ro.close()
    assert synced == fds[:1]


def test_an_image_in_use_is_refused(disk: Path) -> None:
    """OFD locks: readers share an image, a writer has it alone; ,nolock opts out. The locks go
    with the open file, so they hold between two VMs of one process as between two processes."""
    path = str(disk)
    first = VirtioBlk(path)
    try:
        for read_only in (False, True):
            with pytest.raises(VmmError) as caught:
                VirtioBlk(path, read_only)
            user = "writes to it" if read_only else "uses it"
            assert str(caught.value) == (f"disk {path} is locked: another process, or another -d of this one, {user} "
                                         "(add ,nolock to use it anyway)")
        VirtioBlk(path, lock=False).close()  # nolock
    finally:
        first.close()
    readers = [VirtioBlk(path, read_only=True), VirtioBlk(path, read_only=True)]  # shared
    with pytest.raises(VmmError, match="is locked: another process, or another -d of this one, uses it"):
        VirtioBlk(path)  # a writer is refused while it is read
    for r in readers:
        r.close()
    VirtioBlk(path).close()  # the locks went with the fds


# --- entropy, console, network options -------------------------------------------------------
def test_rng_fills_writable_buffers(vm: FakeVm) -> None:
    rng = VirtioRng()
    d = Driver(vm.attach(rng), vm.memory)
    d.init()
    d.queues[0].add([], [64])
    d.queues[0].kick()
    assert d.queues[0].wait_used() == [(0, 64)]
    assert len(set(d.mem.read(d.heap - 64, 64))) > 8
    assert rng.bytes_served == 64


def test_console_input_waits_for_buffers_and_a_connected_port(vm: FakeVm) -> None:
    output: list[bytes] = []
    console = VirtioConsole(output.append)
    d = Driver(vm.attach(console), vm.memory)
    console.receive(b"typed early")  # before the driver is up: it waits
    d.init()
    rx, tx = d.queues
    rx.add([], [4])
    rx.add([], [64])
    rx.kick()
    time.sleep(0.2)
    assert rx.used_idx() == 0  # buffers posted, but the port has not written yet: not connected
    tx.add([b"hello ", b"world\n"], [])
    tx.kick()
    tx.wait_used()
    assert b"".join(output) == b"hello world\n"
    assert [n for _, n in rx.wait_used(2)] == [4, 7]  # now the input flows, across two buffers
    console.receive(b"more")  # buffers posted later bring the rest in
    rx.add([], [64])
    rx.kick()
    assert rx.wait_used() == [(2, 4)]


class NoHost:
    """The host side of a device that needs none (DeviceHost)."""

    def console_output(self, data: bytes) -> None:
        raise AssertionError("no console here")

    def use_console(self, receive: Callable[[bytes], None], kernel_name: str) -> None:
        raise AssertionError("no console here")


NO_HOST = NoHost()


def test_network_mode_none_is_no_nic_as_in_kvmtool() -> None:
    """kvm-unit-tests' runner passes `--network mode=none` to say the test wants no NIC."""
    for options in (["mode=none"], ["mode=none", "mode=none,guest_mac=02:00:00:00:00:01"]):
        assert VhostNet.from_args(argparse.Namespace(network=options), NO_HOST) == []


def test_network_options() -> None:
    assert parse_network("mode=tap,tapif=tap0").tapif == "tap0"
    assert parse_network("mode=none,guest_mac=02:00:00:00:00:01").mac == bytes([2, 0, 0, 0, 0, 1])
    for bad, why in [("mode=tap", "needs tapif"), ("mode=bridge", "tap or none"), ("mode=none,tapif=x", "no tapif"),
                     ("mode=none,guest_mac=01:00:00:00:00:01", "multicast"), ("mode=none,guest_mac=zz", "not a MAC"),
                     ("tapif=" + "x" * 16, "1-15 bytes"), ("speed=10", "not mode=")]:
        with pytest.raises(VmmError, match=why):
            parse_network(bad)


# --- hostile drivers -----------------------------------------------------------------------
def test_a_descriptor_loop_marks_the_device_broken_and_reset_recovers(vm: FakeVm, disk: Path) -> None:
    d = Driver(vm.attach(VirtioBlk(str(disk))), vm.memory)
    d.init()
    q = d.queues[0]
    buf = d.buffer(blk_request(VIRTIO_BLK_T_IN))
    q.put_desc(0, buf, 16, VIRTQ_DESC_F_NEXT, 1)
    q.put_desc(1, buf, 16, VIRTQ_DESC_F_NEXT, 0)  # back to 0
    q.publish_head(0)
    q.kick()
    d.wait_broken()
    assert d.interrupted() & reg.INT_CONFIG_CHANGE
    q.add([blk_request(VIRTIO_BLK_T_FLUSH)], [1])
    q.kick()  # a broken device ignores its queues
    d.write(reg.STATUS, 0)
    assert d.read(reg.STATUS) == 0
    d.init()  # and works again after the reset
    d.queues[0].add([blk_request(VIRTIO_BLK_T_FLUSH)], [1])
    d.queues[0].kick()
    assert d.queues[0].wait_used() == [(0, 1)]


def place_rings(d: Driver, addrs: dict[str, int]) -> None:
    """Write queue 0's ring addresses ("desc", "avail", "used") into the transport's registers."""
    for (lo, hi), a in zip([(reg.QUEUE_DESC_LOW, reg.QUEUE_DESC_HIGH), (reg.QUEUE_DRIVER_LOW, reg.QUEUE_DRIVER_HIGH),
                            (reg.QUEUE_DEVICE_LOW, reg.QUEUE_DEVICE_HIGH)], addrs.values(), strict=True):
        d.write(lo, a & 0xFFFF_FFFF)
        d.write(hi, a >> 32)


@pytest.mark.parametrize("ring", ["desc", "avail", "used"])
def test_rings_outside_ram_or_misaligned_break_the_device(vm: FakeVm, disk: Path, ring: str) -> None:
    d = Driver(vm.attach(VirtioBlk(str(disk))), vm.memory)
    d.write(reg.STATUS, reg.ACKNOWLEDGE | reg.DRIVER)
    d.write(reg.DRIVER_FEATURES_SEL, 1)
    d.write(reg.DRIVER_FEATURES, 1)
    d.write(reg.STATUS, reg.ACKNOWLEDGE | reg.DRIVER | reg.FEATURES_OK)
    addrs = {"desc": RAM, "avail": RAM + 0x1000, "used": RAM + 0x2000}
    addrs[ring] = RAM + RAM_SIZE - 8 if ring != "used" else RAM + 0x2001
    place_rings(d, addrs)
    d.write(reg.QUEUE_READY, 1)
    assert d.read(reg.QUEUE_READY) == 0
    assert d.read(reg.STATUS) & reg.DEVICE_NEEDS_RESET


@pytest.mark.parametrize("ring, length", [("avail", 4 + 2 * 8), ("used", 4 + 8 * 8)])
def test_rings_are_checked_with_their_event_fields_before_the_features_are(vm: FakeVm, disk: Path, ring: str,
                                                                            length: int) -> None:
    """A queue readied before FEATURES_OK (VIRTIO_F_EVENT_IDX not known yet) is checked at the
    size the spec's table gives, with the event index field: a ring that ends 2 bytes short of
    it at the end of RAM breaks the device, else a back-end told of EVENT_IDX at DRIVER_OK
    (vhost-net in the kernel) would reach past it."""
    d = Driver(vm.attach(VirtioBlk(str(disk))), vm.memory)
    d.write(reg.STATUS, reg.ACKNOWLEDGE | reg.DRIVER)
    d.write(reg.QUEUE_NUM, 8)
    addrs = {"desc": RAM, "avail": RAM + 0x1000, "used": RAM + 0x2000}
    addrs[ring] = RAM + RAM_SIZE - length
    place_rings(d, addrs)
    d.write(reg.QUEUE_READY, 1)
    assert d.read(reg.QUEUE_READY) == 0
    assert d.read(reg.STATUS) & reg.DEVICE_NEEDS_RESET


QUEUES: list[Virtqueue] = []  # released before the memory fixture unmaps RAM


def _queue(mem: GuestMemory, size: int = 8) -> Virtqueue:
    """An 8-entry queue with its rings at RAM, RAM+0x1000, RAM+0x2000, indices at 0."""
    mem.write(RAM + 0x1000, bytes(0x2000))
    q = Virtqueue(0, size, mem)
    QUEUES.append(q)
    q.desc_addr, q.avail_addr, q.used_addr = RAM, RAM + 0x1000, RAM + 0x2000
    q.activate(event_idx=True)
    return q


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    mem = GuestMemory()
    mem.add(RAM, RAM_SIZE)
    yield mem
    while QUEUES:
        QUEUES.pop().release()
    mem.close()


def test_queue_errors_name_what_is_wrong(memory: GuestMemory) -> None:
    q = _queue(memory)
    memory.write(RAM + 0x1000, struct.pack("<HHH", 0, 1, 9))  # head 9 of an 8-entry queue
    with pytest.raises(QueueError, match="chain head 9 is beyond the queue size 8"):
        q.pop()
    q = _queue(memory)
    memory.write(RAM + 0x1000, struct.pack("<HH", 0, 200))  # 200 new entries in an 8-entry ring
    with pytest.raises(QueueError, match="available index jumped"):
        q.pop()
    q = _queue(memory)
    memory.write(RAM, DESC.pack(RAM + RAM_SIZE - 4, 64, 0, 0))  # runs off the end of RAM
    memory.write(RAM + 0x1000, struct.pack("<HHH", 0, 1, 0))
    with pytest.raises(QueueError, match="is not in guest RAM"):
        q.pop()
    q = _queue(memory)
    memory.write(RAM, DESC.pack(RAM + 0x3000, 32, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, 1))
    memory.write(RAM + 0x1000, struct.pack("<HHH", 0, 1, 0))
    with pytest.raises(QueueError, match="nested or chained indirect"):
        q.pop()
    q = _queue(memory)
    memory.write(RAM, DESC.pack(RAM + 0x3000, 16, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1))
    memory.write(RAM + 16, DESC.pack(RAM + 0x3000, 16, 0, 0))
    memory.write(RAM + 0x1000, struct.pack("<HHH", 0, 1, 0))
    with pytest.raises(QueueError, match="readable buffer after a writable"):
        q.pop()


def test_split_handles_any_framing() -> None:
    data = memoryview(bytearray(b"abcdefgh"))
    bufs = [data[0:3], data[3:5], data[5:8]]
    head, rest = split(bufs, 4)
    assert b"".join(head) == b"abcd" and b"".join(rest) == b"efgh"
    assert split(bufs, 0) == ([], bufs)
    assert b"".join(split(bufs, 100)[0]) == b"abcdefgh"


def host_ranges(chain: Chain) -> list[tuple[int, int]]:
    """The host memory a device would read or write for `chain`: the struct iovec entries that
    preadv/pwritev/readv/writev get (its memoryviews are made of them, in Chain.view)."""
    return [IOVEC.unpack_from(chain.iov, k) for k in range(0, len(chain.iov), IOVEC.size)]


def in_guest_ram(memory: GuestMemory, host_addr: int, length: int) -> bool:
    ram = memory.regions[0]
    return ram.host_addr <= host_addr and host_addr + length <= ram.host_addr + ram.size


def test_host_ranges_see_a_buffer_outside_guest_ram(memory: GuestMemory) -> None:
    """The check above can fail: a view of the mapping's slack before guest RAM is outside it."""
    ram = memory.regions[0]
    inside = Chain(0, IOVEC.pack(ram.host_addr, 16), 1, 16, 16, [ram])
    assert all(in_guest_ram(memory, a, n) for a, n in host_ranges(inside))
    slack = memoryview(ram.mapping)[:16] if ram.offset else memoryview(bytearray(16))
    outside = Chain(0, IOVEC.pack(int(ffi.cast("uintptr_t", ffi.from_buffer(slack))), 16), 1, 16, 16, [ram])
    assert not all(in_guest_ram(memory, a, n) for a, n in [IOVEC.unpack(outside.iov)])


TABLE = RAM + 0x3000  # where the fuzzed indirect table lives
descriptor = st.tuples(
    st.one_of(st.integers(RAM + 0x4000, RAM + RAM_SIZE - 0x2000), st.integers(0, 2**64 - 1),
              st.integers(RAM - 64, RAM + 64), st.integers(RAM + RAM_SIZE - 64, RAM + RAM_SIZE + 64)),  # addr
    st.one_of(st.integers(0, 4096), st.integers(0, 2**32 - 1)),  # len
    st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7]) | st.integers(0, 0xFFFF),  # flags
    st.integers(0, 7) | st.integers(0, 0xFFFF))  # next
to_table = st.integers(1, 12).map(lambda n: (TABLE, 16 * n, VIRTQ_DESC_F_INDIRECT, 0))


@pytest.mark.fuzz
@settings(max_examples=fuzzing.size(400, 20_000), deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(descs=st.lists(descriptor | to_table, min_size=8, max_size=8),
       indirect=st.lists(descriptor, min_size=1, max_size=9), linear=st.booleans(),
       ring=st.lists(st.integers(0, 7) | st.integers(0, 0xFFFF), min_size=8, max_size=8),
       avail_idx=st.integers(2, 8) | st.integers(0, 0xFFFF), used_event=st.integers(0, 0xFFFF))
def test_hostile_rings_never_escape_or_hang(memory: GuestMemory, descs: list[tuple[int, int, int, int]],
                                            indirect: list[tuple[int, int, int, int]], linear: bool,
                                            ring: list[int], avail_idx: int, used_event: int) -> None:
    """Random descriptor tables, indirect tables (some in the linear layout the fast path takes)
    and available rings: pop() returns chains whose buffers all lie in guest RAM, host addresses
    included, or raises QueueError; nothing else, and it always ends. Ring entry 0 is a
    well-formed chain and entry 1 the fuzzed indirect table, so whenever the available index is
    sane at least one chain is checked, and the table whenever it is at most the queue's size."""
    if linear:  # descriptor k links to k + 1, readable ones first (virtqueue_add_split)
        order = sorted(indirect, key=lambda d: bool(d[2] & VIRTQ_DESC_F_WRITE))
        indirect = [(a, n, (f & VIRTQ_DESC_F_WRITE) | (VIRTQ_DESC_F_NEXT if k + 1 < len(order) else 0), k + 1)
                    for k, (a, n, f, _) in enumerate(order)]
    descs = [(RAM + 0x4000, 64, VIRTQ_DESC_F_WRITE, 0), (TABLE, 16 * len(indirect), VIRTQ_DESC_F_INDIRECT, 0),
             *descs[2:]]
    ring = [0, 1, *ring[2:]]
    q = _queue(memory)
    for i, d in enumerate(descs):
        memory.write(RAM + 16 * i, DESC.pack(*d))
    for i, d in enumerate(indirect):
        memory.write(TABLE + 16 * i, DESC.pack(*d))
    memory.write(RAM + 0x1000, struct.pack("<HH8HH", 0, avail_idx, *ring, used_event))
    popped = 0
    for _ in range(12):
        try:
            chain = q.pop()
        except QueueError:
            break
        if chain is None:
            break
        popped += 1
        assert len(chain.readable) + len(chain.writable) <= 8 * 2
        assert all(in_guest_ram(memory, addr, length) for addr, length in host_ranges(chain))
        q.push(chain.head, sum(map(len, chain.writable)) & 0xFFFF_FFFF)
        q.publish()
        q.want_notifications()
    assert popped >= 1 or not 1 <= avail_idx <= 8
    fuzzing.tally("virtqueue").add("hostile rings popped")


@pytest.mark.fuzz
@settings(max_examples=fuzzing.size(200, 10_000), deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(writes=st.lists(st.tuples(st.integers(0, 0x1FF), st.sampled_from([1, 2, 4, 8]), st.integers(0, 2**32 - 1)),
                       max_size=60))
def test_random_register_writes_never_raise(vm: FakeVm, writes: list[tuple[int, int, int]]) -> None:
    """Whatever a guest writes to any register, at any width, the transport stays consistent."""
    t = vm.transports[0] if vm.transports else vm.attach(VirtioRng())
    t.reset()
    for offset, size, value in writes:
        t.write(offset, size, value & ((1 << 8 * size) - 1))
        t.read(offset, size)
    for offset in range(0, 0x200, 4):
        assert 0 <= t.read(offset, 4) < 2**32
    t.reset()
    assert isinstance(t.irq, IrqFd)
    assert os.path.exists(f"/proc/self/fd/{t.irq.fd}")
    fuzzing.tally("virtio-mmio registers").add("register writes", len(writes))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(buffers=st.lists(st.tuples(st.integers(RAM - 0x100, RAM + RAM_SIZE + 0x100), st.integers(0, 0x2000)),
                        min_size=1, max_size=8),
       nr_readable=st.integers(0, 8), shuffle=st.booleans())
def test_linear_indirect_tables_give_what_the_general_walk_gives(memory: GuestMemory, buffers: list[tuple[int, int]],
                                                                 nr_readable: int, shuffle: bool) -> None:
    """The whole-table arithmetic of the linear fast path agrees with the descriptor-by-descriptor
    walk: the same buffers, or the same verdict that the chain is bad. `shuffle` stores the same
    chain with entries 1.. in reverse table order, which only the general walk follows."""
    q = _queue(memory)
    n = len(buffers)
    # an indirect chain starts at entry 0 (§2.7.5.3.1); shuffled, the rest run backwards
    order = [0, *range(n - 1, 0, -1)] if shuffle else list(range(n))
    slot = {k: order[k] for k in range(n)}  # chain position -> table index
    for k, (addr, length) in enumerate(buffers):
        flags = (VIRTQ_DESC_F_WRITE if k >= nr_readable else 0) | (VIRTQ_DESC_F_NEXT if k + 1 < n else 0)
        memory.write(RAM + 0x3000 + 16 * slot[k], DESC.pack(addr, length, flags, slot.get(k + 1, 0)))
    memory.write(RAM, DESC.pack(RAM + 0x3000, 16 * n, VIRTQ_DESC_F_INDIRECT, 0))
    memory.write(RAM + 0x1000, struct.pack("<HHH", 0, 1, 0))
    inside = [RAM <= a and a + n_ <= RAM + RAM_SIZE for a, n_ in buffers]
    try:
        chain = q.pop()
    except QueueError:
        assert not all(inside[k] for k in range(n) if buffers[k][1])
        return
    assert chain is not None
    expected = [memory.read(a, length) for a, length in buffers if length]
    got = [bytes(b) for b in chain.readable + chain.writable if len(b)]
    assert got == expected
    assert len([b for b in chain.readable if len(b)]) == len([1 for a, ln in buffers[:nr_readable] if ln])
    assert chain.total == sum(length for _, length in buffers)
    assert chain.readable_len == sum(length for _, length in buffers[:nr_readable])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lengths=st.lists(st.integers(0, 40), min_size=1, max_size=8), data=st.data())
def test_a_chain_reads_writes_and_cuts_its_iovec_by_byte_offset(memory: GuestMemory, lengths: list[int],
                                                                 data: st.DataObject) -> None:
    """Chain positions are byte offsets across its buffers, whatever their framing: read, write
    and iov_range agree with the buffers laid end to end (zero-length ones among them)."""
    ram = memory.regions[0]
    assume(sum(lengths) > 0)
    addrs = [RAM + 0x4000 + 0x100 * k for k in range(len(lengths))]
    for a in addrs:
        memory.write(a, bytes(range(a & 0x7F, (a & 0x7F) + 64)))
    iov = b"".join(IOVEC.pack(ram.host_addr + a - RAM, n) for a, n in zip(addrs, lengths, strict=True))
    nr_readable = data.draw(st.integers(0, len(lengths)))
    total = sum(lengths)
    chain = Chain(1, iov, nr_readable, sum(lengths[:nr_readable]), total, [ram])

    def flat() -> bytes:
        return b"".join(memory.read(a, n) for a, n in zip(addrs, lengths, strict=True))

    start = data.draw(st.integers(0, total - 1))
    end = data.draw(st.integers(start, total))
    assert chain.read(start, end - start) == flat()[start:end]
    cut, count = chain.iov_range(start, end)
    entries = [IOVEC.unpack_from(cut, k * IOVEC.size) for k in range(count)]
    assert b"".join(memory.read(host - ram.host_addr + RAM, n) for host, n in entries) == flat()[start:end]
    before, new = flat(), bytes([0xEE]) * data.draw(st.integers(0, 50))
    assert chain.write(start, new) == min(len(new), total - start)
    assert flat() == before[:start] + new[:total - start] + before[start + len(new):]


def test_a_range_ending_at_the_writable_part_leaves_an_empty_buffer_empty(memory: GuestMemory) -> None:
    """Byte 5 is the first writable one, and a zero-length writable buffer comes first: the range
    [0, 6) ends in the 3-byte buffer, not in the empty one made one byte long."""
    ram = memory.regions[0]
    lengths, addrs = [5, 0, 3, 4], [RAM + 0x4000, RAM + 0x5000, RAM + 0x6000, RAM + 0x7000]
    iov = b"".join(IOVEC.pack(ram.host_addr + a - RAM, n) for a, n in zip(addrs, lengths, strict=True))
    chain = Chain(1, iov, 1, 5, 12, [ram])
    cut, count = chain.iov_range(0, 6)
    assert [IOVEC.unpack_from(cut, 16 * k)[1] for k in range(count)] == [5, 0, 1]


def test_a_range_past_the_chain_is_refused_not_handed_to_the_kernel(memory: GuestMemory) -> None:
    """A device that asked for more than the driver gave would get host memory past the buffers."""
    ram = memory.regions[0]
    chain = Chain(2, IOVEC.pack(ram.host_addr, 16) + IOVEC.pack(ram.host_addr + 0x100, 8), 1, 16, 24, [ram])
    for start, end in ((16, 40), (30, 40), (-1, 4), (8, 4)):
        with pytest.raises(IndexError, match="outside chain 2's 24"):
            chain.iov_range(start, end)
    with pytest.raises(IndexError):
        chain.locate(24)
    assert chain.read(24, 4) == b"" and chain.write(24, b"x") == 0
    empty = Chain(3, b"", 0, 0, 0, [ram])
    assert empty.read(0, 4) == b"" and empty.iov_range(0, 0) == (b"", 0)


def test_framed_finds_a_header_and_a_status_in_buffers_of_their_own(memory: GuestMemory) -> None:
    """The framing Linux's virtio_blk uses gives views of the two ends and the iovec between;
    any other framing gives None, and the device goes by offset."""
    ram = memory.regions[0]

    def chain(lengths: list[int], nr_readable: int) -> Chain:
        iov = b"".join(IOVEC.pack(ram.host_addr + 0x100 * k, n) for k, n in enumerate(lengths))
        return Chain(1, iov, nr_readable, sum(lengths[:nr_readable]), sum(lengths), [ram])

    memory.write(RAM, b"H" * 16)
    found = chain([16, 512, 512, 1], 1).framed(16, 1)
    assert found is not None
    header, between, status = found
    assert bytes(header) == b"H" * 16 and len(status) == 1
    assert [IOVEC.unpack_from(between, k * IOVEC.size) for k in range(2)] == \
        [(ram.host_addr + 0x100, 512), (ram.host_addr + 0x200, 512)]
    status[0] = 7
    assert memory.read(RAM + 0x300, 1) == b"\x07"
    assert chain([16, 1], 1).framed(16, 1) is not None  # nothing between
    for lengths, nr_readable in (([8, 8, 512, 1], 2),  # the header spans buffers
                                 ([16, 512, 2], 1),  # the status shares a buffer
                                 ([16, 512, 1], 3),  # the status is readable
                                 ([16, 512, 1], 0),  # the header is writable
                                 ([17], 1)):  # one buffer
        assert chain(lengths, nr_readable).framed(16, 1) is None, lengths


def linear_table(n: int, writable: int, addr: int) -> memoryview:
    flags = [VIRTQ_DESC_F_WRITE if k >= n - writable else 0 for k in range(n)]
    return memoryview(b"".join(DESC.pack(addr, 16, f | (VIRTQ_DESC_F_NEXT if k + 1 < n else 0), k + 1)
                               for k, f in enumerate(flags)))


def test_indirect_tables_of_every_shape_do_not_grow_the_vmm(memory: GuestMemory) -> None:
    """A guest posting linear indirect tables of every length a 256-entry queue allows, with every
    number of writable entries, leaves the VMM holding no more than a bounded cache of them."""
    import tracemalloc

    from pyvmm.devices.virtio.rings.linear_table import linear_chain

    ram = memory.regions[0]
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for n in range(1, 257):
        for writable in range(0, n + 1):
            chain = linear_chain(0, linear_table(n, writable, RAM + 0x4000), [ram])
            assert chain is not None and chain.nr_readable == n - writable
    held = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(before, "filename"))
    tracemalloc.stop()
    assert held < 8 << 20, f"{held >> 10} KiB held after posting tables of every shape"  # ~5 MiB: every length


def test_an_iov_buffer_outside_guest_ram_is_refused(memory: GuestMemory) -> None:
    """Chain.view checks the range itself: a negative offset would otherwise wrap around RAM."""
    ram = memory.regions[0]
    for host, length in ((ram.host_addr - 16, 32), (ram.host_addr + ram.size - 8, 16)):
        chain = Chain(3, IOVEC.pack(host, length), 0, 0, length, [ram])
        with pytest.raises(QueueError, match="buffer 0 of chain 3 is outside guest RAM"):
            chain.view(0)


def net_on_a_socket(vm: FakeVm, monkeypatch: pytest.MonkeyPatch) -> tuple[socket.socket, VirtioNet, Driver]:
    """A virtio-net whose tap is one end of a datagram socket pair: (the host's end, the device,
    its driver, initialised)."""
    from pyvmm.devices.virtio import net as virtio_net

    host, guest_side = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    guest_side.setblocking(False)
    monkeypatch.setattr(virtio_net, "open_tap", lambda name, hdr: guest_side.detach())
    dev = virtio_net.VirtioNet(parse_network("mode=tap,tapif=fake0"))
    d = Driver(vm.attach(dev), vm.memory)
    d.init()
    return host, dev, d


def test_a_receive_buffer_too_small_for_the_header_is_given_back_empty(vm: FakeVm,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A tap refuses a read smaller than its 12-byte header (EINVAL): such a buffer used to be put
    back and tried for ever, and no frame got through again. It is returned empty, and the frame
    goes into the next buffer."""
    host, dev, d = net_on_a_socket(vm, monkeypatch)
    d.queues[0].add([], [8])
    d.queues[0].add([b"readable only"], [])
    d.queues[0].add([], [1514])
    host.send(bytes(12) + b"frame")
    d.queues[0].kick()
    assert d.queues[0].wait_used(3) == [(0, 0), (1, 0), (2, 17)]
    assert dev.rx_frames == 1
    host.close()


def test_a_tap_that_fails_is_no_longer_polled_and_says_so_once(vm: FakeVm, monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture,
                                                             tmp_path: Path) -> None:
    """Any error but EAGAIN (the tap's interface deleted, ...) stops the polling, with one warning,
    rather than a worker spinning on a descriptor that is always ready and always fails."""
    from pyvmm.devices.virtio import net as virtio_net

    # a listening socket with a connection waiting: always readable, and readv gives EINVAL
    listening, waiting = socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)
    listening.bind(str(tmp_path / "tap.sock"))
    listening.listen()
    waiting.connect(str(tmp_path / "tap.sock"))
    broken = os.dup(listening.fileno())  # the device closes its tap
    monkeypatch.setattr(virtio_net, "open_tap", lambda name, hdr: broken)
    dev = virtio_net.VirtioNet(parse_network("mode=tap,tapif=fake0"))
    watched: list[bool] = []
    monkeypatch.setattr(dev, "watch", lambda fd, enabled: watched.append(enabled))
    d = Driver(vm.attach(dev), vm.memory)
    d.init()
    for _ in range(2):
        d.queues[0].add([], [1514])
        d.queues[0].kick()
        deadline = time.monotonic() + 10
        while watched[-1:] != [False] and time.monotonic() < deadline:
            time.sleep(0.01)
        watched.clear()
    assert dev.tap_error == os.strerror(errno.EINVAL) and dev.rx_frames == 0
    assert [r.getMessage() for r in caplog.records if "tap" in r.getMessage()] == [
        f"virtio-net: reading the tap failed: {os.strerror(errno.EINVAL)}; receiving stops"]
    listening.close()
    waiting.close()


def test_received_frames_say_they_are_in_one_buffer(vm: FakeVm, monkeypatch: pytest.MonkeyPatch) -> None:
    """virtio 1.2 §5.1.6.4: without VIRTIO_NET_F_MRG_RXBUF the device sets num_buffers to 1; the
    tap writes the 10-byte header before it and leaves those two bytes as they were."""
    host, dev, d = net_on_a_socket(vm, monkeypatch)
    for header_first in (True, False):  # the header in its own buffer, or split across two
        addr = d.heap
        d.queues[0].add([], [12, 1514] if header_first else [7, 1519])
        d.queues[0].kick()
        host.send(bytes(10) + b"\xff\xff" + b"frame")  # num_buffers as the previous frame left it
        (_, written), = d.queues[0].wait_used()
        assert written == 17
        header = d.mem.read(addr, 12) if header_first else d.mem.read(addr, 7) + d.mem.read(addr + 16, 5)
        assert header[10:12] == b"\x01\x00"
    host.close()

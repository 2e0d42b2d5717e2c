"""The driver side of virtio-mmio for unit tests: a VM stand-in with real guest RAM (anonymous
memory, no KVM), and a driver that initialises a device through its registers (§3.1.1) and
builds split rings in that RAM, as Linux's virtio_mmio and virtio_ring do."""

from __future__ import annotations

import os
import select
import struct
import time
from collections.abc import Callable

from pyvmm.devices.bus import MmioBus
from pyvmm.devices.virtio import mmio_registers as reg
from pyvmm.devices.virtio.device import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1, VirtioDevice
from pyvmm.devices.virtio.rings.layout import DESC, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from pyvmm.devices.virtio.transport import VirtioMmio
from pyvmm.machine.irq_lines import InterruptLines, IrqFd
from pyvmm.machine.memory import GuestMemory
from tests.unit.fakes import FakeVmFd

RAM = 0x8000_0000
RAM_SIZE = 4 << 20


class FakeVm:
    """Guest RAM (anonymous memory), interrupt lines and an MMIO bus: what a transport is handed."""

    def __init__(self, shared: bool = False) -> None:
        self.memory = GuestMemory(shared=shared)  # shared: memfds, as a vhost-user daemon needs
        self.memory.add(RAM, RAM_SIZE)
        self.fd = FakeVmFd()
        self.lines = InterruptLines(self.fd)
        self.mmio = MmioBus()
        self.transports: list[VirtioMmio] = []

    def attach(self, device: VirtioDevice, fatal: Callable[[str], None] | None = None) -> VirtioMmio:
        """A transport at the first virtio-mmio slot, its worker running."""
        t = VirtioMmio(device, reg.VIRTIO_MMIO_BASE, self.memory, self.lines.irqfd(), self.fd.ioeventfd, fatal)
        self.mmio.add(t.base, reg.VIRTIO_MMIO_SIZE, t, t.name)
        self.transports.append(t)
        t.start()
        return t

    def close(self) -> None:
        for t in self.transports:
            assert t.stop(time.monotonic() + 5.0)
            t.close()
        self.lines.close()
        self.memory.close()


class DriverQueue:
    """A split ring laid out in guest RAM the way the driver owns it."""

    def __init__(self, driver: Driver, index: int, size: int, base: int) -> None:
        self.driver, self.index, self.size = driver, index, size
        self.desc, self.avail, self.used = base, base + 16 * size, base + 16 * size + 0x1000
        self.free = 0  # next descriptor slot (the tests never run out)
        self.avail_idx = 0
        self.used_seen = 0
        driver.mem.write(base, bytes(0x2000))  # fresh rings, as a driver allocates them zeroed

    def put_desc(self, i: int, addr: int, length: int, flags: int, nxt: int = 0) -> None:
        self.driver.mem.write(self.desc + 16 * i, DESC.pack(addr, length, flags, nxt))

    def add(self, readable: list[bytes], writable: list[int], indirect: bool = False) -> int:
        """Make one chain available: `readable` buffers' contents, then writable buffers of the
        given sizes. Returns its head descriptor."""
        bufs = [(self.driver.buffer(d), len(d), 0) for d in readable]
        bufs += [(self.driver.buffer(bytes(n)), n, VIRTQ_DESC_F_WRITE) for n in writable]
        if indirect:
            table = self.driver.buffer(bytes(16 * len(bufs)))
            for k, (addr, length, flags) in enumerate(bufs):
                more = VIRTQ_DESC_F_NEXT if k + 1 < len(bufs) else 0
                self.driver.mem.write(table + 16 * k, DESC.pack(addr, length, flags | more, k + 1))
            head = self.free
            self.put_desc(head, table, 16 * len(bufs), VIRTQ_DESC_F_INDIRECT)
            self.free += 1
        else:
            head = self.free
            for k, (addr, length, flags) in enumerate(bufs):
                more = VIRTQ_DESC_F_NEXT if k + 1 < len(bufs) else 0
                self.put_desc(self.free, addr, length, flags | more, self.free + 1)
                self.free += 1
        self.publish_head(head)
        return head

    def publish_head(self, head: int) -> None:
        mem = self.driver.mem
        mem.write(self.avail + 4 + 2 * (self.avail_idx % self.size), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        mem.write(self.avail + 2, struct.pack("<H", self.avail_idx))

    def kick(self) -> None:
        self.driver.write(reg.QUEUE_NOTIFY, self.index)

    def used_idx(self) -> int:
        idx: int = struct.unpack("<H", self.driver.mem.read(self.used + 2, 2))[0]
        return idx

    def wait_used(self, count: int = 1, timeout: float = 5.0) -> list[tuple[int, int]]:
        """The next `count` used elements (id, len), waiting for the device's worker."""
        deadline = time.monotonic() + timeout
        while (self.used_idx() - self.used_seen) & 0xFFFF < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"queue {self.index}: no used buffer within {timeout} s")
            time.sleep(0.002)
        out = []
        for _ in range(count):
            slot = self.used + 4 + 8 * (self.used_seen % self.size)
            out.append(struct.unpack("<II", self.driver.mem.read(slot, 8)))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        return out


class Driver:
    def __init__(self, transport: VirtioMmio, mem: GuestMemory) -> None:
        self.t, self.mem = transport, mem
        self.heap = RAM + 0x10_0000  # buffers go here, rings below
        self.queues: list[DriverQueue] = []

    def read(self, offset: int, size: int = 4) -> int:
        return self.t.read(offset, size)

    def write(self, offset: int, value: int, size: int = 4) -> None:
        self.t.write(offset, size, value)

    def buffer(self, data: bytes) -> int:
        addr = self.heap
        self.mem.write(addr, data)
        self.heap += (len(data) + 15) & ~15 or 16
        return addr

    def features(self) -> int:
        self.write(reg.DEVICE_FEATURES_SEL, 0)
        low = self.read(reg.DEVICE_FEATURES)
        self.write(reg.DEVICE_FEATURES_SEL, 1)
        return low | self.read(reg.DEVICE_FEATURES) << 32

    def init(self, features: int | None = None, queue_size: int | None = None,
             ready: tuple[int, ...] | None = None) -> None:
        """§3.1.1: reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK, queues, DRIVER_OK; only
        the queues `ready` names are set up, if given (by default all)."""
        assert self.read(reg.MAGIC_VALUE) == reg.MAGIC and self.read(reg.VERSION_REG) == 2
        self.write(reg.STATUS, 0)
        self.write(reg.STATUS, reg.ACKNOWLEDGE)
        self.write(reg.STATUS, reg.ACKNOWLEDGE | reg.DRIVER)
        offered = self.features()
        if features is None:
            features = offered & (VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX | VIRTIO_F_INDIRECT_DESC | 0xFFFFFF)
        for sel in (0, 1):
            self.write(reg.DRIVER_FEATURES_SEL, sel)
            self.write(reg.DRIVER_FEATURES, (features >> 32 * sel) & 0xFFFF_FFFF)
        self.write(reg.STATUS, reg.ACKNOWLEDGE | reg.DRIVER | reg.FEATURES_OK)
        assert self.read(reg.STATUS) & reg.FEATURES_OK, "device refused the features"
        self.queues = []
        for i in range(len(self.t.queues)) if ready is None else ready:
            self.write(reg.QUEUE_SEL, i)
            size = queue_size or self.read(reg.QUEUE_NUM_MAX)
            q = DriverQueue(self, i, size, RAM + 0x4000 * i)
            self.write(reg.QUEUE_NUM, size)
            for lo, hi, addr in ((reg.QUEUE_DESC_LOW, reg.QUEUE_DESC_HIGH, q.desc),
                                 (reg.QUEUE_DRIVER_LOW, reg.QUEUE_DRIVER_HIGH, q.avail),
                                 (reg.QUEUE_DEVICE_LOW, reg.QUEUE_DEVICE_HIGH, q.used)):
                self.write(lo, addr & 0xFFFF_FFFF)
                self.write(hi, addr >> 32)
            self.write(reg.QUEUE_READY, 1)
            self.queues.append(q)
        self.write(reg.STATUS, reg.ACKNOWLEDGE | reg.DRIVER | reg.FEATURES_OK | reg.DRIVER_OK)

    def interrupted(self, timeout: float = 5.0) -> int:
        """Wait for the irqfd to be signalled; returns InterruptStatus and acknowledges it."""
        assert isinstance(self.t.irq, IrqFd)  # FakeVm.attach wires each transport to an irqfd
        fd = self.t.irq.fd
        if not select.select([fd], [], [], timeout)[0]:
            raise AssertionError("no interrupt")
        os.eventfd_read(fd)
        isr = self.read(reg.INTERRUPT_STATUS)
        self.write(reg.INTERRUPT_ACK, isr)
        return isr

    def wait_broken(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.read(reg.STATUS) & reg.DEVICE_NEEDS_RESET:
            if time.monotonic() > deadline:
                raise AssertionError("the device did not ask for a reset")
            time.sleep(0.002)

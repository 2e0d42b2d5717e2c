"""The virtio-mmio transport, version 2 (virtio 1.2 §4.2; no legacy interface).

One instance per device, at kvmtool's addresses (0x3000000 upwards, 0x200 each) with its own
SPI. The fast path never involves a vCPU thread in Python:
  * queue notifications: a KVM ioeventfd per queue on QueueNotify (datamatch = queue index), so
    KVM completes the guest's write and signals the eventfd without leaving the kernel;
  * device work: one worker thread per device polls those eventfds (and any backend fds);
  * interrupts: a KVM irqfd on the device's SPI, signalled by the worker.
vCPU threads only see the transport's registers: set-up, InterruptStatus and InterruptACK.

A driver that breaks the rules (malformed chains, rings outside RAM, DRIVER_OK without
FEATURES_OK) gets the device marked DEVICE_NEEDS_RESET with a configuration-change interrupt
(§2.1.2); the device then ignores its queues until the driver writes status 0.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from devicetree.builder import U64, Node, Phandles
from kvm_bindings.constants import KVM_IOEVENTFD_FLAG_DATAMATCH
from pyvmm.devices.virtio.device import TRANSPORT_FEATURES, VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1, VirtioDevice
from pyvmm.devices.virtio.queue import QueueError, Virtqueue

if TYPE_CHECKING:
    from pyvmm.vm import Vm

log = logging.getLogger("pyvmm")

VIRTIO_MMIO_BASE = 0x300_0000  # kvmtool's arm64 KVM_VIRTIO_MMIO_AREA
VIRTIO_MMIO_SIZE = 0x200  # kvmtool's per-device window: registers + configuration space
MAGIC = 0x7472_6976  # "virt"
VERSION = 2
VENDOR_ID = int.from_bytes(b"PYVM", "little")

# Registers (§4.2.2, table "MMIO Device Register Layout")
MAGIC_VALUE, VERSION_REG, DEVICE_ID, VENDOR = 0x000, 0x004, 0x008, 0x00C
DEVICE_FEATURES, DEVICE_FEATURES_SEL = 0x010, 0x014
DRIVER_FEATURES, DRIVER_FEATURES_SEL = 0x020, 0x024
QUEUE_SEL, QUEUE_NUM_MAX, QUEUE_NUM, QUEUE_READY = 0x030, 0x034, 0x038, 0x044
QUEUE_NOTIFY = 0x050
INTERRUPT_STATUS, INTERRUPT_ACK = 0x060, 0x064
STATUS = 0x070
QUEUE_DESC_LOW, QUEUE_DESC_HIGH = 0x080, 0x084
QUEUE_DRIVER_LOW, QUEUE_DRIVER_HIGH = 0x090, 0x094
QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH = 0x0A0, 0x0A4
SHM_SEL, SHM_LEN_LOW, SHM_LEN_HIGH, SHM_BASE_LOW, SHM_BASE_HIGH = 0x0AC, 0x0B0, 0x0B4, 0x0B8, 0x0BC
CONFIG_GENERATION = 0x0FC
CONFIG = 0x100

# Device status bits (§2.1)
ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK = 1, 2, 4, 8
DEVICE_NEEDS_RESET, FAILED = 0x40, 0x80
# InterruptStatus bits (§4.2.2)
INT_USED_BUFFER, INT_CONFIG_CHANGE = 1, 2

GIC_SPI, IRQ_TYPE_EDGE_RISING = 0, 1  # an irqfd injects an edge, as kvmtool and QEMU declare


class VirtioMmio:
    def __init__(self, vm: Vm, device: VirtioDevice, base: int, spi: int) -> None:
        self.device, self.base, self.spi = device, base, spi
        self.name = f"virtio-{device.name}"
        self.queues = [Virtqueue(i, n, vm.memory) for i, n in enumerate(device.queue_sizes)]
        self.device_features = device.features | TRANSPORT_FEATURES
        self.lock = threading.Lock()  # transport and queue state: vCPU register writes vs. the worker
        self._isr_lock = threading.Lock()
        self._reset_registers()
        self._irq_fd = os.eventfd(0, os.EFD_CLOEXEC)
        self._kick_fds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in self.queues]
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC)
        vm.irqfd(self._irq_fd, spi)
        for i, fd in enumerate(self._kick_fds):
            vm.fd.ioeventfd(base + QUEUE_NOTIFY, 4, fd, KVM_IOEVENTFD_FLAG_DATAMATCH, i)
        vm.add_device(base, VIRTIO_MMIO_SIZE, self, self.name, dt=self)
        device.attach(self)
        self._poller = select.poll()
        self._handlers: dict[int, Callable[[], None] | None] = {self._stop_fd: None}
        for q, fd in zip(self.queues, self._kick_fds, strict=True):
            self._handlers[fd] = self._kick_handler(fd, q)
        for fd, fn in device.poll_fds().items():
            self._handlers[fd] = self._backend_handler(fn)
        for fd in self._handlers:
            self._poller.register(fd, select.POLLIN)
        self._thread = threading.Thread(target=self._work, name=self.name, daemon=True)
        self._thread.start()

    def _reset_registers(self) -> None:
        self.status = 0
        self.device_features_sel = self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.shm_sel = 0
        self.config_generation = 0
        self.broken: str | None = None
        with self._isr_lock:
            self.isr = 0

    @property
    def running(self) -> bool:
        """DRIVER_OK and not broken: the device may use its queues."""
        return bool(self.status & DRIVER_OK) and self.broken is None

    # --- device tree ---------------------------------------------------------------------
    def dt_node(self, ph: Phandles) -> Node:
        # Documentation/devicetree/bindings/virtio/mmio.yaml
        return Node(f"virtio@{self.base:x}", {
            "compatible": "virtio,mmio", "reg": [U64(self.base), U64(VIRTIO_MMIO_SIZE)],
            "interrupts": [GIC_SPI, self.spi, IRQ_TYPE_EDGE_RISING], "dma-coherent": True})

    # --- registers (vCPU threads) --------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if offset >= CONFIG:
            off = offset - CONFIG
            return int.from_bytes(bytes(self.device.config[off:off + size]).ljust(size, b"\0"), "little")
        if size != 4 or offset & 3:
            return 0  # §4.2.2.2: registers are read 32 bits wide
        if offset == INTERRUPT_STATUS:
            return self.isr
        if offset == MAGIC_VALUE:
            return MAGIC
        if offset == VERSION_REG:
            return VERSION
        if offset == DEVICE_ID:
            return self.device.device_id
        if offset == VENDOR:
            return VENDOR_ID
        if offset == DEVICE_FEATURES:
            return (self.device_features >> (32 * self.device_features_sel)) & 0xFFFF_FFFF \
                if self.device_features_sel < 2 else 0
        if offset == STATUS:
            return self.status
        if offset == CONFIG_GENERATION:
            return self.config_generation
        if offset in (SHM_LEN_LOW, SHM_LEN_HIGH, SHM_BASE_LOW, SHM_BASE_HIGH):
            return 0xFFFF_FFFF  # no shared memory regions: length and base read as -1
        q = self._selected()
        if q is None:
            return 0
        if offset == QUEUE_NUM_MAX:
            return q.max_size
        if offset == QUEUE_READY:
            return int(q.ready)
        return 0  # write-only registers

    def write(self, offset: int, size: int, value: int) -> None:
        if offset >= CONFIG:
            with self.lock:
                self.device.write_config(offset - CONFIG, value.to_bytes(size, "little"))
            return
        if size != 4 or offset & 3:
            return
        if offset == QUEUE_NOTIFY:  # only when the ioeventfd did not catch it
            if value < len(self._kick_fds):
                os.eventfd_write(self._kick_fds[value], 1)
            return
        if offset == INTERRUPT_ACK:
            with self._isr_lock:
                self.isr &= ~value
            return
        with self.lock:
            if offset == STATUS:
                self._set_status(value)
            elif offset == DEVICE_FEATURES_SEL:
                self.device_features_sel = value
            elif offset == DRIVER_FEATURES_SEL:
                self.driver_features_sel = value
            elif offset == DRIVER_FEATURES:
                if self.driver_features_sel < 2 and not self.status & FEATURES_OK:
                    shift = 32 * self.driver_features_sel
                    self.driver_features = (self.driver_features & ~(0xFFFF_FFFF << shift)) | (value << shift)
            elif offset == QUEUE_SEL:
                self.queue_sel = value
            elif offset == SHM_SEL:
                self.shm_sel = value
            else:
                self._write_queue(offset, value)

    def _selected(self) -> Virtqueue | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def _write_queue(self, offset: int, value: int) -> None:
        q = self._selected()
        if q is None:
            return
        if offset == QUEUE_READY:
            if value & 1 and not q.ready:
                try:
                    q.activate(bool(self.driver_features & VIRTIO_F_EVENT_IDX))
                except QueueError as e:
                    self._break(str(e))
            elif not value & 1:
                q.release()
            return
        if q.ready:
            return  # §4.2.2.3: the driver sets a queue up only while it is not ready
        if offset == QUEUE_NUM:
            q.size = value
        elif offset in (QUEUE_DESC_LOW, QUEUE_DESC_HIGH):
            q.desc_addr = _set_half(q.desc_addr, offset == QUEUE_DESC_HIGH, value)
        elif offset in (QUEUE_DRIVER_LOW, QUEUE_DRIVER_HIGH):
            q.avail_addr = _set_half(q.avail_addr, offset == QUEUE_DRIVER_HIGH, value)
        elif offset in (QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH):
            q.used_addr = _set_half(q.used_addr, offset == QUEUE_DEVICE_HIGH, value)

    def _set_status(self, value: int) -> None:
        """Device status transitions (§3.1.1 driver initialisation, §2.1 status field)."""
        if value == 0:
            self._reset()
            return
        new, old = value & 0xFF, self.status
        if new & FEATURES_OK and not old & FEATURES_OK and not self._features_acceptable():
            new &= ~FEATURES_OK  # the driver reads it back and gives up (§3.1.1 step 6)
        if new & DRIVER_OK and not old & DRIVER_OK:
            if not new & FEATURES_OK:
                self.status = new
                self._break("DRIVER_OK without FEATURES_OK")
                return
            self.status = new
            self._safely(self.device.activate, self.driver_features)
            for fd in self._kick_fds:  # buffers made available before DRIVER_OK
                os.eventfd_write(fd, 1)
        self.status = new | (DEVICE_NEEDS_RESET if self.broken else 0)

    def _features_acceptable(self) -> bool:
        f = self.driver_features
        return not f & ~self.device_features and bool(f & VIRTIO_F_VERSION_1)

    def _reset(self) -> None:
        """Status 0 (§4.2.3.1) or a VM reset: everything back to its initial state."""
        for q in self.queues:
            q.release()
            q.reset()
        self._reset_registers()
        self.device.reset()

    def reset(self) -> None:
        """The VM is reset: the device is as it was at power-on."""
        with self.lock:
            self._reset()

    def _break(self, why: str) -> None:
        if self.broken is None:
            log.warning("%s at %#x: %s; the device needs a reset", self.name, self.base, why)
        self.broken = why
        self.status |= DEVICE_NEEDS_RESET
        self.config_generation += 1
        self._interrupt(INT_CONFIG_CHANGE)

    # --- the worker thread ---------------------------------------------------------------
    def _work(self) -> None:
        while True:
            for fd, events in self._poller.poll():
                handler = self._handlers.get(fd)
                if handler is None:
                    if fd == self._stop_fd:
                        return
                    continue
                if events & (select.POLLERR | select.POLLHUP | select.POLLNVAL) and not events & select.POLLIN:
                    log.warning("%s: backend fd %d failed; no longer watched", self.name, fd)
                    self._poller.unregister(fd)
                    continue
                handler()

    def _kick_handler(self, fd: int, queue: Virtqueue) -> Callable[[], None]:
        notify = self.device.notify

        def kicked() -> None:
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                pass
            with self.lock:
                if self.running and queue.ready:
                    self._safely(notify, queue)
        return kicked

    def _backend_handler(self, fn: Callable[[], None]) -> Callable[[], None]:
        def ready() -> None:
            with self.lock:
                self._safely(fn)
        return ready

    def _safely(self, fn: Callable[..., None], *args: object) -> None:
        """Run device code (lock held): a broken ring rule or a device bug breaks the device,
        never the VMM."""
        try:
            fn(*args)
        except QueueError as e:
            self._break(str(e))
        except Exception as e:
            log.exception("%s", self.name)
            self._break(f"internal error: {type(e).__name__}: {e}")

    def watch(self, fd: int, enabled: bool) -> None:
        """Worker thread: start or stop polling a backend fd."""
        self._poller.modify(fd, select.POLLIN if enabled else 0)

    def publish(self, queue: Virtqueue) -> None:
        if queue.publish():
            self._interrupt(INT_USED_BUFFER)

    def _interrupt(self, bit: int) -> None:
        with self._isr_lock:
            self.isr |= bit
        os.eventfd_write(self._irq_fd, 1)

    # --- teardown ------------------------------------------------------------------------
    def close(self) -> None:
        os.eventfd_write(self._stop_fd, 1)
        self._thread.join(5.0)
        with self.lock:
            for q in self.queues:
                q.release()
            self.device.close()
        for fd in (self._irq_fd, self._stop_fd, *self._kick_fds):
            os.close(fd)


def _set_half(current: int, high: bool, value: int) -> int:
    if high:
        return (current & 0xFFFF_FFFF) | (value << 32)
    return (current & ~0xFFFF_FFFF) | value

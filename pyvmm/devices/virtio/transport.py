"""The virtio-mmio transport, version 2 (virtio 1.2 §4.2; no legacy interface).

One instance per device, at kvmtool's addresses (0x3000000 upwards, 0x200 each) with its own
SPI. A transport is handed what it needs and no more: guest RAM, its interrupt line (an irqfd), and
a way to register ioeventfds. The fast path never involves a vCPU thread in Python:
  * queue notifications: a KVM ioeventfd per queue on QueueNotify (datamatch = queue index), so
    KVM completes the guest's write and signals the eventfd without leaving the kernel;
  * device work: one worker thread per device polls those eventfds (and any backend fds);
  * interrupts: a KVM irqfd on the device's SPI, signalled by the worker;
  * the interrupt status: its used-buffer bit always reads as set and its ACK is a KVM ioeventfd
    nobody reads, so of Linux's vm_interrupt (status, ACK, ring scan) only the status load leaves
    KVM, and the vCPU loop answers it as a hot register (devices/bus.py). A scan with nothing used
    is harmless (a hint, §2.7.7; as Firecracker's vhost-user devices). A config change is real.

A vhost device (`external_queues`, vhost.py) hands the kick eventfds and the irqfd's eventfd to
the kernel or its daemon, which interrupts the guest itself; the worker leaves them alone.

Locking: `_state` guards the registers and queue set-up, held briefly by vCPU threads and the
worker; device work (a disk read, an fsync, a frame) runs outside it, so no register access waits
behind I/O. A reset, or the release of a queue made not ready, is deferred until the worker has
finished the request in flight (status 0 reads back non-zero until then, and the driver must wait
for 0, §2.4.1); only a driver that writes registers before its reset has completed waits, and
never while the machine stops or resets.

A driver that breaks the rules (malformed chains, rings outside RAM, DRIVER_OK without
FEATURES_OK) gets the device marked DEVICE_NEEDS_RESET with a configuration-change interrupt
(§2.1.2); the device then ignores its queues, and hands none to a vhost back-end, until the
driver writes status 0.
"""

from __future__ import annotations

import functools
import logging
import os
import select
import threading
import time
from collections.abc import Callable
from typing import Protocol

from devicetree.builder import U64, Node, Phandles
from kvm_bindings.constants import KVM_IOEVENTFD_FLAG_DATAMATCH
from pyvmm.devices.virtio import mmio_registers as reg
from pyvmm.devices.virtio.device import VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1, VirtioDevice
from pyvmm.devices.virtio.rings.chain import QueueError
from pyvmm.devices.virtio.rings.queue import Virtqueue
from pyvmm.machine.memory import GuestMemory


class Interrupt(Protocol):
    """The transport's interrupt line (pyvmm.machine.irq_lines.IrqFd is one)."""

    spi: int

    fd: int  # the irqfd's eventfd, which a vhost-user daemon signals itself

    def trigger(self) -> None: ...


FAILED = select.EPOLLERR | select.EPOLLHUP  # an fd the worker stops watching, if it is not readable too
IoEventFdRegistrar = Callable[[int, int, int, int, int], None]  # (addr, len, fd, flags, datamatch)

log = logging.getLogger("pyvmm")


class VirtioMmio:
    def __init__(self, device: VirtioDevice, base: int, memory: GuestMemory, irq: Interrupt,
                 ioeventfd: IoEventFdRegistrar, fatal: Callable[[str], None] | None = None) -> None:
        """`fatal`: ends the machine's run with a message (a vhost-user daemon that went away)."""
        self.device, self.base, self.irq, self.memory = device, base, irq, memory
        self.spi = irq.spi
        self.name = f"virtio-{device.name}"
        self.queues = [Virtqueue(i, n, memory) for i, n in enumerate(device.queue_sizes)]
        self.device_features = device.features | device.transport_features
        self.external = device.external_queues
        self._fatal = fatal
        self._lock = threading.RLock()  # the worker takes it bare: Condition.__enter__ is Python code
        self._state = threading.Condition(self._lock)  # registers and queue set-up
        self._busy = False  # the worker is in device code
        self._idle_waiters = 0  # vCPU threads in _wait_idle: the worker wakes them only if any
        self._reset_pending = False  # status 0 was written while it was: the worker resets the device
        self._release_pending: list[Virtqueue] = []  # queues made not ready while it was
        self._isr_lock = threading.Lock()
        self._reset_registers()
        self._kick_fds: list[int] = []
        self._poller = select.epoll()  # the worker's; closed with the fds
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._ack_fd = -1  # the ioeventfd that takes the ACK of used buffers
        self._thread: threading.Thread | None = None
        self._stopping = False  # the machine is stopping or resetting: nothing waits for the worker
        try:
            for i in range(len(self.queues)):
                fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                self._kick_fds.append(fd)
                ioeventfd(base + reg.QUEUE_NOTIFY, 4, fd, KVM_IOEVENTFD_FLAG_DATAMATCH, i)
            self._ack_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            ioeventfd(base + reg.INTERRUPT_ACK, 4, self._ack_fd, KVM_IOEVENTFD_FLAG_DATAMATCH, reg.INT_USED_BUFFER)
            device.attach(self)
            self._handlers: dict[int, Callable[[], None]] = {}
            for fd, fn in device.poll_fds().items():
                self._handlers[fd] = functools.partial(self._device_work, fn)
                self._poller.register(fd, select.EPOLLIN)
            if not self.external:
                # Edge-triggered: every write to an eventfd wakes its waiters, so each kick is an
                # event of its own and the counter need not be read back to zero (one system call
                # less per kick; KVM's eventfd_signal saturates the counter, never fails).
                for q, fd in zip(self.queues, self._kick_fds, strict=True):
                    self._handlers[fd] = functools.partial(self._device_work, device.notify, q)
                    self._poller.register(fd, select.EPOLLIN | select.EPOLLET)
            self._poller.register(self._stop_fd, select.EPOLLIN)
        except BaseException:
            self._close_fds()
            raise

    def _reset_registers(self) -> None:
        self.status = 0
        self.device_features_sel = self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.shm_sel = 0
        self.config_generation = 0
        self.broken: str | None = None
        with self._isr_lock:
            self.isr = 0  # the configuration-change bit (the used-buffer bit reads as set)

    @property
    def running(self) -> bool:
        """DRIVER_OK and not broken: the device may use its queues."""
        return bool(self.status & reg.DRIVER_OK) and self.broken is None

    # --- device tree ---------------------------------------------------------------------
    def dt_node(self, ph: Phandles) -> Node:
        # Documentation/devicetree/bindings/virtio/mmio.yaml
        return Node(f"virtio@{self.base:x}", {
            "compatible": "virtio,mmio", "reg": [U64(self.base), U64(reg.VIRTIO_MMIO_SIZE)],
            "interrupts": [reg.GIC_SPI, self.spi, reg.IRQ_TYPE_EDGE_RISING], "dma-coherent": True})

    # --- registers (vCPU threads) --------------------------------------------------------
    def interrupt_status(self) -> int:  # read on every interrupt: a hot register (devices/bus.py)
        return self.isr | reg.INT_USED_BUFFER

    def read(self, offset: int, size: int) -> int:
        if offset >= reg.CONFIG:
            off = offset - reg.CONFIG
            return int.from_bytes(bytes(self.device.config[off:off + size]).ljust(size, b"\0"), "little")
        if size != 4 or offset & 3:
            return 0  # §4.2.2.2: registers are read 32 bits wide
        if offset == reg.INTERRUPT_STATUS:
            return self.interrupt_status()
        if offset == reg.MAGIC_VALUE:
            return reg.MAGIC
        if offset == reg.VERSION_REG:
            return reg.VERSION
        if offset == reg.DEVICE_ID:
            return self.device.device_id
        if offset == reg.VENDOR:
            return reg.VENDOR_ID
        if offset == reg.DEVICE_FEATURES:
            return (self.device_features >> (32 * self.device_features_sel)) & 0xFFFF_FFFF \
                if self.device_features_sel < 2 else 0
        if offset == reg.STATUS:
            return self.status
        if offset == reg.CONFIG_GENERATION:
            return self.config_generation
        if offset in (reg.SHM_LEN_LOW, reg.SHM_LEN_HIGH, reg.SHM_BASE_LOW, reg.SHM_BASE_HIGH):
            return 0xFFFF_FFFF  # no shared memory regions: length and base read as -1
        q = self._selected()
        if q is None:
            return 0
        if offset == reg.QUEUE_NUM_MAX:
            return q.max_size
        if offset == reg.QUEUE_READY:
            return int(q.ready)
        return 0  # write-only registers

    def write(self, offset: int, size: int, value: int) -> None:
        if offset >= reg.CONFIG:
            with self._state:
                self.device.write_config(offset - reg.CONFIG, value.to_bytes(size, "little"))
            return
        if size != 4 or offset & 3:
            return
        if offset == reg.QUEUE_NOTIFY:  # only when the ioeventfd did not catch it
            if value < len(self._kick_fds):
                os.eventfd_write(self._kick_fds[value], 1)
            return
        if offset == reg.INTERRUPT_ACK:
            with self._isr_lock:
                self.isr &= ~value
            return
        with self._state:
            if self._reset_pending and not self._wait_idle():
                return  # the machine is stopping or resetting the device itself
            if offset == reg.STATUS:
                self._set_status(value)
            elif offset == reg.DEVICE_FEATURES_SEL:
                self.device_features_sel = value
            elif offset == reg.DRIVER_FEATURES_SEL:
                self.driver_features_sel = value
            elif offset == reg.DRIVER_FEATURES:
                if self.driver_features_sel < 2 and not self.status & reg.FEATURES_OK:
                    shift = 32 * self.driver_features_sel
                    self.driver_features = (self.driver_features & ~(0xFFFF_FFFF << shift)) | (value << shift)
            elif offset == reg.QUEUE_SEL:
                self.queue_sel = value
            elif offset == reg.SHM_SEL:
                self.shm_sel = value
            else:
                self._write_queue(offset, value)

    def _selected(self) -> Virtqueue | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def _write_queue(self, offset: int, value: int) -> None:
        q = self._selected()
        if q is None:
            return
        if offset == reg.QUEUE_READY:
            if value & 1 and not q.ready:
                try:
                    q.activate(bool(self.driver_features & VIRTIO_F_EVENT_IDX))
                except QueueError as e:
                    self._break_locked(str(e))
            elif not value & 1:
                if self._busy:  # the worker may be using this queue's rings: it releases them
                    q.ready = False
                    self._release_pending.append(q)
                else:
                    q.release()
            return
        if q.ready:
            return  # §4.2.2.3: the driver sets a queue up only while it is not ready
        if offset == reg.QUEUE_NUM:
            q.size = value
        elif offset in (reg.QUEUE_DESC_LOW, reg.QUEUE_DESC_HIGH):
            q.desc_addr = _set_half(q.desc_addr, offset == reg.QUEUE_DESC_HIGH, value)
        elif offset in (reg.QUEUE_DRIVER_LOW, reg.QUEUE_DRIVER_HIGH):
            q.avail_addr = _set_half(q.avail_addr, offset == reg.QUEUE_DRIVER_HIGH, value)
        elif offset in (reg.QUEUE_DEVICE_LOW, reg.QUEUE_DEVICE_HIGH):
            q.used_addr = _set_half(q.used_addr, offset == reg.QUEUE_DEVICE_HIGH, value)

    def _set_status(self, value: int) -> None:
        """Device status transitions (§3.1.1 driver initialisation, §2.1 status field)."""
        if value == 0:
            if self._busy:
                self._reset_pending = True  # when the request in flight is done (§2.4.1)
            else:
                self._reset()
            return
        new, old = value & 0xFF, self.status
        if new & reg.FEATURES_OK and not old & reg.FEATURES_OK and not self._features_acceptable():
            new &= ~reg.FEATURES_OK  # the driver reads it back and gives up (§3.1.1 step 6)
        if new & reg.DRIVER_OK and not old & reg.DRIVER_OK and self.broken is None:
            if not new & reg.FEATURES_OK:
                self.status = new
                self._break_locked("DRIVER_OK without FEATURES_OK")
                return
            self.status = new
            try:
                self.device.activate(self.driver_features)
            except Exception as e:  # a device bug breaks the device, not the vCPU thread
                self._break_locked(f"internal error: {type(e).__name__}: {e}")
                return
            for fd in self._kick_fds:  # buffers made available before DRIVER_OK
                os.eventfd_write(fd, 1)
        self.status = new | (reg.DEVICE_NEEDS_RESET if self.broken else 0)

    def _features_acceptable(self) -> bool:
        f = self.driver_features
        return not f & ~self.device_features and bool(f & VIRTIO_F_VERSION_1)

    def _reset(self) -> None:
        """Status 0 (§4.2.3.1) or a VM reset: everything back to its initial state."""
        self._reset_pending = False
        self._release_pending.clear()
        for q in self.queues:
            q.release()
            q.reset()
        self._reset_registers()
        self.device.reset()

    def _wait_idle(self) -> bool:
        """With _state held: wait until the worker is out of device code. False if the machine
        stops or resets meanwhile (release_waiters()): a stuck backend never holds a vCPU."""
        self._idle_waiters += 1
        while self._busy and not self._stopping:
            self._state.wait(0.1)
        self._idle_waiters -= 1
        return not self._busy

    def _break(self, why: str) -> None:
        with self._state:
            self._break_locked(why)

    def _break_locked(self, why: str) -> None:
        if self.broken is None:
            log.warning("%s at %#x: %s; the device needs a reset", self.name, self.base, why)
        self.broken = why
        self.status |= reg.DEVICE_NEEDS_RESET
        self.config_generation += 1
        self._interrupt(reg.INT_CONFIG_CHANGE)

    # --- the life cycle (pyvmm/machine/lifecycle.py) ------------------------------------------------
    def release_waiters(self) -> None:
        """The machine is about to stop its vCPUs: none may wait for this device any more."""
        with self._state:
            self._stopping = True
            self._state.notify_all()

    def start(self) -> None:
        """Start the worker thread."""
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name=self.name, daemon=True)
        self._thread.start()
        for fd in self._kick_fds if not self.external else ():
            os.eventfd_write(fd, 1)  # an edge the last worker took as it stopped: served now

    def stop(self, deadline: float) -> bool:
        """End the worker; False if it had not ended by `deadline` (stuck in a backend)."""
        t = self._thread
        if t is None:
            return True
        self.release_waiters()
        os.eventfd_write(self._stop_fd, 1)
        t.join(max(0.0, deadline - time.monotonic()))
        if t.is_alive():
            return False
        self._thread = None
        try:
            os.eventfd_read(self._stop_fd)
        except BlockingIOError:
            pass
        return True

    def quiesce(self, deadline: float) -> bool:
        """For a machine reset: nothing writes into guest RAM any more (the worker, a daemon)."""
        stopped = self.stop(deadline)
        if self.external:
            self.device.reset()  # stops the daemon's rings (GET_VRING_BASE)
        return stopped

    def reset(self) -> None:
        """The machine is reset (worker stopped): the device is as it was at power-on."""
        with self._state:
            self._reset()

    def resume(self) -> None:
        self.start()

    # --- the worker thread ---------------------------------------------------------------
    def _work(self) -> None:
        """Serve kicks and backend fds until told to stop. Nothing a guest or a device does
        ends this loop: a failure breaks the device (NEEDS_RESET) and the loop goes on."""
        while True:
            for fd, events in self._poller.poll():
                if fd == self._stop_fd:
                    return
                handler = self._handlers.get(fd)
                if handler is None:
                    continue
                try:
                    if events & FAILED and not events & select.EPOLLIN:
                        log.warning("%s: backend fd %d failed; no longer watched", self.name, fd)
                        self._poller.unregister(fd)
                        continue
                    handler()
                except Exception as e:  # a pyvmm bug: the device stops, the VMM does not
                    log.error("%s: internal error: %s: %s", self.name, type(e).__name__, e)
                    self._break(f"internal error: {type(e).__name__}: {e}")

    def _device_work(self, fn: Callable[..., None], queue: Virtqueue | None = None) -> None:
        """Run device code on the worker, outside _state: a broken ring rule or a device bug
        breaks the device, never the VMM."""
        with self._lock:
            if not self.running or self._reset_pending or (queue is not None and not queue.ready):
                return
            self._busy = True
        try:
            fn() if queue is None else fn(queue)
        except QueueError as e:
            self._break(str(e))
        except Exception as e:
            log.error("%s: internal error: %s: %s", self.name, type(e).__name__, e)
            self._break(f"internal error: {type(e).__name__}: {e}")
        finally:
            self._work_done()

    def _work_done(self) -> None:
        """Out of device code: do what the driver asked for meanwhile and wake who waits."""
        with self._lock:
            self._busy = False
            if self._reset_pending:
                self._reset()
            for q in self._release_pending:
                if not q.ready:  # not set up again meanwhile
                    q.release()
            self._release_pending.clear()
            if self._idle_waiters:  # skipped, Condition.notify_all is two Python frames on every request
                self._state.notify_all()

    def live_queue(self, index: int) -> Virtqueue | None:
        queue = self.queues[index]
        return queue if self.running and queue.ready else None

    def watch(self, fd: int, enabled: bool) -> None:
        """Worker thread: start or stop polling a backend fd."""
        self._poller.modify(fd, select.EPOLLIN if enabled else 0)

    # --- for a vhost device (vhost.py's RingHost) ----------------------------------------------
    def kick_fd(self, index: int) -> int:
        return self._kick_fds[index]

    def call_fd(self) -> int:
        return self.irq.fd

    def fatal(self, message: str) -> None:
        if self._fatal is None:
            log.error("%s", message)
        else:
            self._fatal(message)

    def publish(self, queue: Virtqueue) -> None:
        if queue.publish():
            self.irq.trigger()  # the used-buffer bit reads as set already

    def _interrupt(self, bit: int) -> None:
        with self._isr_lock:
            self.isr |= bit
        self.irq.trigger()

    # --- teardown ------------------------------------------------------------------------
    def close(self) -> None:
        """After stop() returned True: drop the ring views and release the backend."""
        for q in self.queues:
            q.release()
        self.device.close()
        self._close_fds()

    def _close_fds(self) -> None:
        for fd in (self._stop_fd, *self._kick_fds, *([self._ack_fd] if self._ack_fd >= 0 else [])):
            os.close(fd)
        self._kick_fds, self._ack_fd = [], -1
        self._poller.close()


def _set_half(current: int, high: bool, value: int) -> int:
    if high:
        return (current & 0xFFFF_FFFF) | (value << 32)
    return (current & ~0xFFFF_FFFF) | value

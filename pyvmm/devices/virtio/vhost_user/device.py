"""A virtio device whose rings a vhost-user back-end serves: pyvmm sets the rings up and then
stays out of their way.

At DRIVER_OK the back-end gets the negotiated features, the memory table (guest RAM is memfds,
pyvmm/machine/memory.py) and each ring: its size, where its three parts are, a kick eventfd and
a call eventfd. The kick eventfd is the transport's KVM ioeventfd on QueueNotify, so a guest's
notification reaches the daemon from KVM directly; the call eventfd is the device's KVM irqfd,
so the daemon's interrupt reaches the GIC directly. The transport keeps InterruptStatus's
used-buffer bit set and answers InterruptACK's used-buffer writes with an ioeventfd (see
transport.py), so no pyvmm thread relays anything on the way of a request.

A device reset (status 0) or a machine reset stops every ring (GET_VRING_BASE); the next
DRIVER_OK sets everything up again. A back-end that goes away ends the run:
its socket is watched for the hang-up by a thread of its own.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from collections.abc import Callable, Sequence
from typing import Protocol, cast

from pyvmm.devices.virtio.device import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    Transport,
    VirtioDevice,
)
from pyvmm.devices.virtio.rings.queue import Virtqueue
from pyvmm.devices.virtio.vhost_user.protocol import (
    F_PROTOCOL_FEATURES,
    MemoryRegion,
    VhostUserConnection,
    VhostUserError,
)
from pyvmm.machine.memory import GuestMemory

log = logging.getLogger("pyvmm")

RING_FEATURES = VIRTIO_F_INDIRECT_DESC | VIRTIO_F_EVENT_IDX | VIRTIO_F_VERSION_1


class RingHost(Protocol):
    """What a vhost-user device needs of its transport (transport.py's VirtioMmio is one)."""

    memory: GuestMemory
    queues: list[Virtqueue]

    def kick_fd(self, index: int) -> int:
        """The eventfd KVM signals when the driver notifies queue `index`."""

    def call_fd(self) -> int:
        """The eventfd that raises the device's interrupt (its KVM irqfd)."""

    def fatal(self, message: str) -> None:
        """End the machine's run with `message`: the device cannot go on."""


class VhostUserDevice(VirtioDevice):
    """Base of devices served by a vhost-user back-end. A subclass sets device_id, name,
    queue_sizes and its configuration space, and `device_features`: the device-specific feature
    bits pyvmm may pass on from the back-end."""

    external_queues = True
    device_features = 0

    def __init__(self, socket_path: str, what: str, on_close: Callable[[], None] | None = None) -> None:
        """Connect to the back-end at `socket_path` and learn its features. `on_close`: run when
        the device is closed (stopping a daemon pyvmm started)."""
        super().__init__()
        self.what = what
        self._on_close = on_close
        self.connection = VhostUserConnection(socket_path, what)
        try:
            offered, queues = self.connection.handshake()
        except BaseException:
            self.connection.close()
            raise
        if queues and queues < len(self.queue_sizes):
            self.connection.close()
            raise VhostUserError(f"{what}: the back-end serves {queues} queues, the device has {len(self.queue_sizes)}")
        if not offered & VIRTIO_F_VERSION_1:
            self.connection.close()
            raise VhostUserError(f"{what}: the back-end does not offer VIRTIO_F_VERSION_1")
        # what the guest is offered: the back-end's ring features and device bits pyvmm knows
        self.features = offered & self.device_features & ~F_PROTOCOL_FEATURES
        self.transport_features = offered & RING_FEATURES
        self.host: RingHost | None = None
        self._started: list[int] = []
        self._lost = threading.Event()  # the back-end hung up (reported once)
        self._stop_watch = os.eventfd(0, os.EFD_CLOEXEC)
        self._watcher = threading.Thread(target=self._watch, name=f"{what} watch", daemon=True)
        self._watcher.start()

    # --- the transport's calls -------------------------------------------------------------
    def attach(self, transport: Transport) -> None:
        super().attach(transport)
        self.host = cast(RingHost, transport)  # a transport that saw external_queues is one
        if self._lost.is_set():  # gone before there was a run to end: end it now
            self.host.fatal(f"{self.what}: {self.lost_reason()}")

    def activate(self, driver_features: int) -> None:
        super().activate(driver_features)
        host = self.host
        assert host is not None
        try:
            self.connection.set_features(driver_features)
            self.connection.set_mem_table(self._memory_table(host.memory))
            for q in host.queues:
                if q.ready:
                    self.connection.start_ring(
                        q.index, q.size, q.last_avail, host.memory.host_address(q.desc_addr, 1),
                        host.memory.host_address(q.avail_addr, 1), host.memory.host_address(q.used_addr, 1),
                        host.kick_fd(q.index), host.call_fd())
                    self._started.append(q.index)
        except VhostUserError as e:
            self._fail(str(e))

    def reset(self) -> None:
        started, self._started = self._started, []
        if self._lost.is_set():
            return
        try:  # the next DRIVER_OK sets everything up again; the guest's FUSE_INIT resets the daemon
            for index in started:
                self.connection.stop_ring(index)
        except VhostUserError as e:
            self._fail(str(e))

    def close(self) -> None:
        os.eventfd_write(self._stop_watch, 1)
        self._watcher.join(5)
        self.connection.close()
        os.close(self._stop_watch)
        if self._on_close is not None:
            self._on_close()

    # --- the back-end's health ---------------------------------------------------------------
    def _watch(self) -> None:
        """Wait for the back-end's hang-up (POLLRDHUP: the socket is never read here)."""
        poller = select.poll()
        poller.register(self.connection.fileno(), select.POLLRDHUP)
        poller.register(self._stop_watch, select.POLLIN)
        while True:
            for fd, events in poller.poll():
                if fd == self._stop_watch:
                    return
                if events & (select.POLLRDHUP | select.POLLHUP | select.POLLERR):
                    self._fail(f"{self.what}: {self.lost_reason()}")
                    return

    def lost_reason(self) -> str:
        """What to say when the back-end has gone (a daemon pyvmm started says how it ended)."""
        return "the vhost-user back-end closed its socket"

    def _fail(self, message: str) -> None:
        if self._lost.is_set():
            return
        self._lost.set()
        if self.host is not None:
            self.host.fatal(message)
        else:
            log.error("%s", message)

    @staticmethod
    def _memory_table(memory: GuestMemory) -> Sequence[MemoryRegion]:
        regions = [r for r in memory.regions if r.fd >= 0]
        if not regions:
            raise VhostUserError("guest RAM is not shared: build the VM with Vm(shared_memory=True)")
        return [MemoryRegion(r.gpa, r.size, r.host_addr, r.offset, r.fd) for r in regions]

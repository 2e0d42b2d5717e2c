"""A virtio device whose rings a vhost-user back-end serves (vhost.py's VhostDevice, with a
daemon behind a unix socket as the back-end).

The daemon maps guest RAM itself, from the memfds the memory table carries
(pyvmm/machine/memory.py), so the VM's RAM must be shared. A back-end that goes away ends the
run: its socket is watched for the hang-up by a thread of its own.
"""

from __future__ import annotations

import os
import select
import threading
from collections.abc import Callable, Sequence

from pyvmm.devices.virtio.device import VIRTIO_F_VERSION_1, Transport
from pyvmm.devices.virtio.vhost import RING_FEATURES, VhostDevice
from pyvmm.devices.virtio.vhost_user.protocol import (
    F_PROTOCOL_FEATURES,
    MemoryRegion,
    VhostUserConnection,
    VhostUserError,
)
from pyvmm.machine.memory import GuestMemory


class VhostUserBackend:
    """The RingBackend of a vhost-user connection: its memory table names memfds."""

    def __init__(self, connection: VhostUserConnection) -> None:
        self.connection = connection
        self.set_features = connection.set_features
        self.start_ring = connection.start_ring
        self.stop_ring = connection.stop_ring

    def set_mem_table(self, memory: GuestMemory) -> None:
        self.connection.set_mem_table(memory_table(memory))


def memory_table(memory: GuestMemory) -> Sequence[MemoryRegion]:
    regions = [r for r in memory.regions if r.fd >= 0]
    if not regions:
        raise VhostUserError("guest RAM is not shared: build the VM with Vm(shared_memory=True)")
    return [MemoryRegion(r.gpa, r.size, r.host_addr, r.offset, r.fd) for r in regions]


class VhostUserDevice(VhostDevice):
    """Base of devices served by a vhost-user back-end. A subclass sets device_id, name,
    queue_sizes and its configuration space, and `device_features`: the device-specific feature
    bits pyvmm may pass on from the back-end; `protocol_features`: those it cannot do without
    (vhost-user-blk's CONFIG, for its configuration space)."""

    needs_shared_memory = True
    device_features = 0
    protocol_features = 0

    def __init__(self, socket_path: str, what: str, on_close: Callable[[], None] | None = None) -> None:
        """Connect to the back-end at `socket_path` and learn its features. `on_close`: run when
        the device is closed (stopping a daemon pyvmm started)."""
        super().__init__(what)
        self._on_close = on_close
        self.connection = VhostUserConnection(socket_path, what)
        try:
            offered, queues = self.connection.handshake(self.protocol_features)
        except BaseException:
            self.connection.close()
            raise
        if queues and queues < len(self.queue_sizes):
            self.connection.close()
            raise VhostUserError(f"{what}: the back-end serves {queues} queues, the device has {len(self.queue_sizes)}")
        if not offered & VIRTIO_F_VERSION_1:
            self.connection.close()
            raise VhostUserError(f"{what}: the back-end does not offer VIRTIO_F_VERSION_1")
        self.offered = offered  # the back-end's features
        # what the guest is offered: the back-end's ring features and device bits pyvmm knows
        self.features = offered & self.device_features & ~F_PROTOCOL_FEATURES
        self.transport_features = offered & RING_FEATURES
        self.backend = VhostUserBackend(self.connection)
        self._stop_watch = os.eventfd(0, os.EFD_CLOEXEC)
        self._watcher = threading.Thread(target=self._watch, name=f"{what} watch", daemon=True)
        self._watcher.start()

    def attach(self, transport: Transport) -> None:
        super().attach(transport)
        if self._failed.is_set():  # gone before there was a run to end: end it now
            assert self.host is not None
            self.host.fatal(f"{self.what}: {self.lost_reason()}")

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
                    self.fail(f"{self.what}: {self.lost_reason()}")
                    return

    def lost_reason(self) -> str:
        """What to say when the back-end has gone (a daemon pyvmm started says how it ended)."""
        return "the vhost-user back-end closed its socket"

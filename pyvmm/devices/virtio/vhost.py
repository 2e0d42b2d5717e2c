"""Devices whose rings something else serves: the kernel (vhost-net, drivers/vhost/) or a daemon
(vhost-user, vhost_user/). pyvmm sets the rings up and then stays out of their way.

At DRIVER_OK the back-end gets the negotiated features, the memory table and each ring: its size,
where its three parts are in this process, the next available index, a kick eventfd and a call
eventfd. The kick eventfd is the transport's KVM ioeventfd on QueueNotify, so a guest's
notification reaches the back-end from KVM directly; the call eventfd is the device's KVM irqfd,
so the back-end's interrupt reaches the GIC directly; and the transport answers InterruptACK
with an ioeventfd (transport.py). No pyvmm thread relays anything on the way of a request.

A device may keep a queue the back-end does not serve (vhost-vsock's event queue): its kick
eventfd is then nobody's. A device reset (status 0) or a machine reset stops every ring
(GET_VRING_BASE); the next DRIVER_OK sets everything up again. A back-end that refuses a request ends the run with one line.
rust-vmm's vhost crate has the same split: one front-end, a kernel and a vhost-user back-end.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol, cast

from pyvmm.devices.virtio.device import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    Transport,
    VirtioDevice,
)
from pyvmm.devices.virtio.rings.queue import Virtqueue
from pyvmm.errors import VmmError
from pyvmm.kvm.fds import VhostFd
from pyvmm.machine.memory import GuestMemory

log = logging.getLogger("pyvmm")

RING_FEATURES = VIRTIO_F_INDIRECT_DESC | VIRTIO_F_EVENT_IDX | VIRTIO_F_VERSION_1


class RingHost(Protocol):
    """What a vhost device needs of its transport (transport.py's VirtioMmio is one)."""

    memory: GuestMemory
    queues: list[Virtqueue]

    def kick_fd(self, index: int) -> int:
        """The eventfd KVM signals when the driver notifies queue `index`."""

    def call_fd(self) -> int:
        """The eventfd that raises the device's interrupt (its KVM irqfd)."""

    def fatal(self, message: str) -> None:
        """End the machine's run with `message`: the device cannot go on."""


class RingBackend(Protocol):
    """Who serves the rings: the requests every vhost back-end takes (vhost.h, vhost-user.rst)."""

    def set_features(self, features: int) -> None: ...

    def set_mem_table(self, memory: GuestMemory) -> None: ...

    def start_ring(self, index: int, size: int, base: int, desc: int, avail: int, used: int, kick: int,
                   call: int) -> None:
        """Serve ring `index` from avail index `base`; addresses are this process's."""

    def stop_ring(self, index: int) -> int:
        """Stop serving ring `index`; returns the next avail index it would have read."""


class VhostDevice(VirtioDevice):
    """Base of devices a back-end serves. A subclass sets device_id, name, queue_sizes, its
    configuration space, features and transport_features (what the guest is offered), and
    `backend` before the device is attached."""

    external_queues = True
    backend: RingBackend
    backend_queues: tuple[int, ...] | None = None  # the queues the back-end serves (None: all)

    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what  # "vhost-net on tap tap0", for messages
        self.host: RingHost | None = None
        self._started: list[int] = []
        self._failed = threading.Event()  # the back-end failed (reported once)

    def backend_features(self, driver_features: int) -> int:
        """What the back-end is told of the negotiated features (by default all of them)."""
        return driver_features

    def rings_started(self, started: list[int]) -> None:
        """The rings `started` (those the driver made ready) are set up: vhost-vsock starts
        them all at once here."""

    def rings_stopping(self) -> None:
        """The rings are about to be stopped."""

    # --- the transport's calls -------------------------------------------------------------
    def attach(self, transport: Transport) -> None:
        super().attach(transport)
        self.host = cast(RingHost, transport)  # a transport that saw external_queues is one

    def activate(self, driver_features: int) -> None:
        super().activate(driver_features)
        host = self.host
        assert host is not None
        try:
            self.backend.set_features(self.backend_features(driver_features))
            self.backend.set_mem_table(host.memory)
            address = host.memory.host_address
            served = self.backend_queues
            for q in host.queues:
                if q.ready and (served is None or q.index in served):
                    self.backend.start_ring(q.index, q.size, q.last_avail, address(q.desc_addr, 1),
                                            address(q.avail_addr, 1), address(q.used_addr, 1),
                                            host.kick_fd(q.index), host.call_fd())
                    self._started.append(q.index)
            self.rings_started(self._started)
        except VmmError as e:
            self.fail(str(e))

    def reset(self) -> None:
        started, self._started = self._started, []
        if self._failed.is_set():
            return
        try:
            if started:
                self.rings_stopping()
            for index in started:
                self.backend.stop_ring(index)
        except VmmError as e:
            self.fail(str(e))

    def fail(self, message: str) -> None:
        """The back-end cannot go on: the run ends with `message` (said once)."""
        if self._failed.is_set():
            return
        self._failed.set()
        if self.host is not None:
            self.host.fatal(message)
        else:
            log.error("%s", message)


class KernelVhost:
    """A RingBackend over a kernel vhost device. `attach(index, on)`, where given, gives ring
    `index` its device-specific backend once it is set up, and takes it away before it is stopped
    (vhost-net: VHOST_NET_SET_BACKEND with the tap)."""

    def __init__(self, vhost: VhostFd, attach: Callable[[int, bool], None] | None = None) -> None:
        self.vhost, self._attach = vhost, attach

    def set_features(self, features: int) -> None:
        self.vhost.set_features(features)

    def set_mem_table(self, memory: GuestMemory) -> None:
        """The guest's RAM, where its buffers may be (not memory KVM keeps for itself)."""
        self.vhost.set_mem_table([(r.gpa, r.size, r.host_addr) for r in memory.regions if r.ram])

    def start_ring(self, index: int, size: int, base: int, desc: int, avail: int, used: int, kick: int,
                   call: int) -> None:
        # the ring's layout first: vhost refuses it (EBUSY) once the ring has a backend
        # (vhost_vring_set_num_addr); the call fd before the kick, which starts the polling
        self.vhost.set_vring_num(index, size)
        self.vhost.set_vring_addr(index, desc, used, avail)
        self.vhost.set_vring_base(index, base)
        self.vhost.set_vring_call(index, call)
        self.vhost.set_vring_kick(index, kick)
        if self._attach is not None:
            self._attach(index, True)

    def stop_ring(self, index: int) -> int:
        # taking the backend away flushes the ring's worker (vhost_net_set_backend; vhost-vsock's
        # SET_RUNNING 0 in rings_stopping), so the base read after it is where the kernel stopped,
        # and it no longer writes into guest RAM
        if self._attach is not None:
            self._attach(index, False)
        return self.vhost.get_vring_base(index)

"""What a virtio device model is, independent of its transport (virtio 1.2 §2, §5).

A device declares its ID, feature bits, queue sizes and configuration space, and handles queue
notifications on its transport's worker thread (never a vCPU thread). It also declares its own
command-line options (add_arguments, from_args). Adding a device type is one new module with one
subclass, plus its line in CLI_DEVICES (registry.py); the transport (transport.py) does the rest.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Protocol

from pyvmm.devices.virtio.rings.chain import Chain
from pyvmm.devices.virtio.rings.queue import Virtqueue

# Reserved feature bits (§6)
VIRTIO_F_INDIRECT_DESC = 1 << 28
VIRTIO_F_EVENT_IDX = 1 << 29
VIRTIO_F_VERSION_1 = 1 << 32
TRANSPORT_FEATURES = VIRTIO_F_INDIRECT_DESC | VIRTIO_F_EVENT_IDX | VIRTIO_F_VERSION_1


class DeviceHost(Protocol):
    """What a device made from the command line may need of the host side (the CLI is one)."""

    def console_output(self, data: bytes) -> None:
        """Write to the host's console (standard output)."""

    def use_console(self, receive: Callable[[bytes], None], kernel_name: str) -> None:
        """This device is the guest's console: host input goes to `receive`, and the kernel's
        console is `kernel_name` (its console= default)."""


class Transport(Protocol):
    """What a device asks of its transport (transport.py's VirtioMmio is one), from its worker
    thread."""

    def publish(self, queue: Virtqueue) -> None:
        """Make what was pushed on `queue` visible to the driver, interrupting it if it asked."""

    def watch(self, fd: int, enabled: bool) -> None:
        """Watch, or stop watching, one of the device's poll_fds()."""

    def live_queue(self, index: int) -> Virtqueue | None:
        """Queue `index` if the driver has it running (DRIVER_OK, the queue ready), else None."""


class VirtioDevice:
    """Base of device models. Subclasses set the class attributes and override the hooks."""

    device_id: int = 0  # §5: 1 net, 2 block, 3 console, 4 entropy
    name: str = "virtio"
    queue_sizes: tuple[int, ...] = ()
    features: int = 0  # device-specific feature bits
    transport_features: int = TRANSPORT_FEATURES  # the ring features offered with them
    external_queues = False  # the kernel or a daemon serves the queues (vhost.py)
    needs_shared_memory = False  # guest RAM must be memfds the back-end maps (vhost-user)

    def __init__(self) -> None:
        self.transport: Transport | None = None
        self.config = bytearray()  # the device configuration space, little-endian fields
        self.driver_features = 0  # valid once the device is activated

    # --- the command line (pyvmm run) -----------------------------------------------------
    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """Add this device type's options to `pyvmm run`."""

    @classmethod
    def from_args(cls, args: argparse.Namespace, host: DeviceHost) -> list[VirtioDevice]:
        """The devices of this type the parsed options ask for, in the order given."""
        return []

    # --- called by the transport ---------------------------------------------------------
    def attach(self, transport: Transport) -> None:
        self.transport = transport

    def activate(self, driver_features: int) -> None:
        """DRIVER_OK: the driver is ready; start any backend work (worker thread)."""
        self.driver_features = driver_features

    def reset(self) -> None:
        """The driver reset the device (status 0) or the VM was reset (worker thread idle)."""

    def notify(self, queue: Virtqueue) -> None:
        """The driver made buffers available on `queue` (worker thread)."""

    def write_config(self, offset: int, data: bytes) -> None:
        """The driver wrote the configuration space; read-only by default (§4.2.2.2)."""

    def poll_fds(self) -> dict[int, Callable[[], None]]:
        """Extra file descriptors the worker watches for this device (fd -> handler); what
        epoll(7) watches (eventfds, sockets, taps; not regular files)."""
        return {}

    def close(self) -> None:
        """The VM is going away: release backends (worker thread stopped)."""

    # --- for subclasses --------------------------------------------------------------------
    def used(self, queue: Virtqueue) -> None:
        """Publish what was pushed on `queue` and interrupt the driver if it asked for that."""
        assert self.transport is not None
        self.transport.publish(queue)

    def serve(self, queue: Virtqueue, handle: Callable[[Chain], int]) -> None:
        """Serve every available chain with `handle` (returns the bytes it wrote into the
        chain). Completions are published (with an interrupt, if the driver wants one) once
        the driver has nothing more queued, so a lone request is answered at once and a burst
        with one interrupt. The driver's notifications are re-armed before that check
        (§2.7.10), so a chain it adds afterwards comes with a kick, and the interrupt is the
        last thing done: the guest's interrupt handler, whose status read is a vCPU thread
        in Python, waits for no more of this thread's Python than its way back to epoll."""
        assert self.transport is not None
        publish = self.transport.publish
        while True:
            chain = queue.pop()
            if chain is not None:
                queue.push(chain.head, handle(chain))
            if not queue.want_notifications():
                publish(queue)  # nothing new to publish after a spurious kick: no interrupt
                return

    def watch(self, fd: int, enabled: bool) -> None:
        """From the worker thread: watch or stop watching one of poll_fds() (flow control)."""
        assert self.transport is not None
        self.transport.watch(fd, enabled)

"""virtio-console with one port (virtio 1.2 §5.3), `--console virtio`: the guest's hvc0.

transmitq carries the guest's output to the host console; receiveq carries host input (typed
keys, a pipe) to the guest. Input waits, up to 64 KiB (older bytes are dropped beyond that, as a
UART's FIFO would overflow), until the driver has receive buffers posted and has written to the
port once: without VIRTIO_CONSOLE_F_MULTIPORT there is no PORT_OPEN message (§5.3.6.2), and
Linux posts its receive buffers before it connects the port, discarding what arrives in between
(drivers/char/virtio_console.c, in_intr); a port that has written is connected.
"""

from __future__ import annotations

import argparse
import os
import threading
from collections.abc import Callable

from pyvmm.devices.virtio.device import DeviceHost, VirtioDevice
from pyvmm.devices.virtio.rings.chain import Chain
from pyvmm.devices.virtio.rings.queue import Virtqueue

RECEIVEQ, TRANSMITQ = 0, 1  # port 0's queues (§5.3.2)
QUEUE_SIZE = 64
MAX_PENDING_INPUT = 64 << 10
OUTPUT_PIECE = 64 << 10


class VirtioConsole(VirtioDevice):
    device_id = 3
    name = "console"
    queue_sizes = (QUEUE_SIZE, QUEUE_SIZE)

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--console", choices=["serial", "virtio"], default="serial",
                            help="the guest console: serial (16550A at 0x1000000, ttyS0) or virtio (hvc0)")

    @classmethod
    def from_args(cls, args: argparse.Namespace, host: DeviceHost) -> list[VirtioDevice]:
        if args.console != "virtio":
            return []
        console = cls(host.console_output)
        host.use_console(console.receive, "hvc0")
        return [console]

    def __init__(self, output: Callable[[bytes], None]) -> None:
        super().__init__()
        self.output = output
        # struct virtio_console_config (§5.3.4): cols, rows, max_nr_ports, emerg_wr; none of
        # SIZE, MULTIPORT, EMERG_WRITE is offered, so all read as zero
        self.config = bytearray(12)
        self._input = bytearray()
        self._input_lock = threading.Lock()
        self._input_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._connected = False  # the guest has written to the port

    def receive(self, data: bytes) -> None:
        """Host input for the guest (any thread)."""
        with self._input_lock:
            self._input += data
            del self._input[:-MAX_PENDING_INPUT]
        os.eventfd_write(self._input_fd, 1)

    def poll_fds(self) -> dict[int, Callable[[], None]]:
        return {self._input_fd: self._input_arrived}

    def notify(self, queue: Virtqueue) -> None:
        if queue.index == TRANSMITQ:
            was_connected = self._connected
            self.serve(queue, self._transmit)
            if self._connected and not was_connected:
                self._input_arrived()
        else:
            self._deliver(queue)

    def reset(self) -> None:
        self._connected = False

    def _transmit(self, chain: Chain) -> int:
        self._connected = True
        for buf in chain.readable:
            # in pieces: a chain may name all of guest RAM, the host must not copy it at once
            for start in range(0, len(buf), OUTPUT_PIECE):
                self.output(bytes(buf[start:start + OUTPUT_PIECE]))
        return 0

    def _input_arrived(self) -> None:
        try:
            os.eventfd_read(self._input_fd)
        except BlockingIOError:
            pass
        assert self.transport is not None
        receiveq = self.transport.live_queue(RECEIVEQ)
        if receiveq is not None:
            self._deliver(receiveq)

    def _deliver(self, queue: Virtqueue) -> None:
        """Move pending input into posted receive buffers; what does not fit waits for the
        driver's next buffers (its notification brings us back here)."""
        while self._connected:
            with self._input_lock:
                if not self._input:
                    break
                chain = queue.pop()
                if chain is None:
                    if queue.want_notifications():
                        continue
                    break
                n = chain.write(chain.readable_len, bytes(self._input))
                del self._input[:n]
            queue.push(chain.head, n)
        self.used(queue)

    def close(self) -> None:
        os.close(self._input_fd)

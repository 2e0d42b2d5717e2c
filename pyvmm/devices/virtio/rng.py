"""virtio-rng, the entropy device (virtio 1.2 §5.4), `--rng`: the host's getrandom(2).

The driver posts device-writable buffers; each is filled from getrandom, at most 64 KiB per
request so that a hostile request for all of guest RAM costs no more than a small one.
"""

from __future__ import annotations

import argparse
import os

from pyvmm.devices.virtio.device import DeviceHost, VirtioDevice
from pyvmm.devices.virtio.rings.chain import Chain
from pyvmm.devices.virtio.rings.queue import Virtqueue

QUEUE_SIZE = 64
MAX_REQUEST = 64 << 10


class VirtioRng(VirtioDevice):
    device_id = 4
    name = "rng"
    queue_sizes = (QUEUE_SIZE,)

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--rng", action="store_true", help="a virtio-rng entropy device fed by getrandom")

    @classmethod
    def from_args(cls, args: argparse.Namespace, host: DeviceHost) -> list[VirtioDevice]:
        return [cls()] if args.rng else []

    def __init__(self) -> None:
        super().__init__()
        self.bytes_served = 0

    def notify(self, queue: Virtqueue) -> None:
        self.serve(queue, self._fill)

    def _fill(self, chain: Chain) -> int:
        done = 0
        for buf in chain.writable:
            n = min(len(buf), MAX_REQUEST - done)
            if n <= 0:
                break
            buf[:n] = os.getrandom(n)
            done += n
        self.bytes_served += done
        return done

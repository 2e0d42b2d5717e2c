"""virtio-9p (virtio 1.2 §5.16 lists device ID 9; Linux's net/9p/trans_virtio.c is the driver),
`--9p DIR,TAG[,ro]` as kvmtool spells it: the host directory DIR, which the guest mounts with
`mount -t 9p -o trans=virtio TAG /mnt`.

One request queue; each chain holds one 9P2000.L T-message in its readable buffers and room for
the R-message in its writable ones. The file server (pyvmm/ninep/server.py) answers them on the
device's worker thread, in order.
"""

from __future__ import annotations

import argparse
import os
import resource
import struct
from typing import TYPE_CHECKING

from pyvmm.devices.virtio.device import DeviceHost, VirtioDevice
from pyvmm.devices.virtio.rings.chain import Chain
from pyvmm.devices.virtio.rings.queue import Virtqueue
from pyvmm.errors import VmmError

if TYPE_CHECKING:
    from pyvmm.ninep.server import FileServer

QUEUE_SIZE = 128
VIRTIO_9P_MOUNT_TAG = 1 << 0  # the configuration space holds the tag
TAG_MAX = 0xFFFF  # le16 tag_len; Linux caps what it reads at 64 KiB


def parse_share(spec: str) -> tuple[str, str, bool]:
    """`DIR,TAG[,ro]` -> (dir, tag, read_only)."""
    parts = spec.split(",")
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise VmmError(f"9p share {spec!r}: give DIR,TAG[,ro]")
    path, tag, *opts = parts
    for o in opts:
        if o != "ro":
            raise VmmError(f"9p share {spec!r}: unknown option {o!r} (DIR,TAG[,ro])")
    return path, tag, "ro" in opts


def _raise_file_limit() -> None:
    """Each share may hold up to MAX_OPEN host files for the guest; the usual soft limit of
    1024 descriptors would leave pyvmm itself none, so it goes up to the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        want = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
        except (ValueError, OSError):
            pass  # as it was: a share then fails EMFILE sooner, which the guest sees


class Virtio9p(VirtioDevice):
    device_id = 9
    name = "9p"
    queue_sizes = (QUEUE_SIZE,)
    features = VIRTIO_9P_MOUNT_TAG

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--9p", dest="ninep", action="append", default=[], metavar="DIR,TAG[,ro]",
                            help="share a host directory over virtio-9p (9P2000.L), mounted in the guest with "
                                 "mount -t 9p -o trans=virtio TAG DIR; ro: read-only; repeatable")

    @classmethod
    def from_args(cls, args: argparse.Namespace, host: DeviceHost) -> list[VirtioDevice]:
        return [cls(*parse_share(spec)) for spec in args.ninep]

    def __init__(self, path: str, tag: str, read_only: bool = False, opaque: frozenset[str] = frozenset()) -> None:
        super().__init__()
        _raise_file_limit()
        raw = tag.encode()
        if not raw or len(raw) > TAG_MAX or b"\0" in raw:
            raise VmmError(f"9p tag {tag!r} must be 1 to {TAG_MAX} bytes without NUL")
        if not os.path.isdir(path):
            raise VmmError(f"9p share {path} is not a directory")
        # the file server, imported with the first share: `pyvmm run` registers this device
        # type whether or not it is used, and the server is a large module
        from pyvmm.ninep.server import FileServer

        try:
            self.server: FileServer = FileServer(path, read_only=read_only, opaque=opaque)
        except OSError as e:
            raise VmmError(f"9p share {path}: {e.strerror}") from None
        self.path, self.tag, self.read_only = path, tag, read_only
        # struct virtio_9p_config: le16 tag_len, u8 tag[tag_len]
        self.config = bytearray(struct.pack("<H", len(raw)) + raw)
        self.requests = 0

    def notify(self, queue: Virtqueue) -> None:
        self.serve(queue, self._request)

    def _request(self, chain: Chain) -> int:
        self.requests += 1
        return self.server.handle(chain.readable, chain.writable)

    def reset(self) -> None:
        self.server.end_session()

    def close(self) -> None:
        self.server.close()

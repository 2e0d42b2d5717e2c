"""virtio-fs (virtio 1.2 §5.11, device ID 26; Linux's fs/fuse/virtio_fs.c is the driver), served
by virtiofsd over vhost-user: FUSE requests go from the guest's rings to the daemon and back with
no pyvmm code on their way (vhost_user/device.py says how).

`--fs DIR,TAG[,ro][,cache=MODE]` starts a virtiofsd on DIR (vhost_user/virtiofsd.py);
`--fs socket=PATH,tag=TAG` attaches to one the user runs. The guest mounts it with
`mount -t virtiofs TAG /mnt`. Guest RAM is then shared memory (memfds) the daemon maps.
"""

from __future__ import annotations

import argparse
import logging
import os
import struct
from typing import TYPE_CHECKING, NamedTuple

from pyvmm.devices.virtio.device import DeviceHost, VirtioDevice
from pyvmm.devices.virtio.vhost_user.device import VhostUserDevice
from pyvmm.errors import VmmError
from pyvmm.machine.host import HOST_NOTES

if TYPE_CHECKING:
    from pyvmm.devices.virtio.vhost_user.virtiofsd import Virtiofsd

QUEUE_SIZE = 1024  # each request queue's; the daemon takes any power of two
REQUEST_QUEUES = 1  # virtiofsd serves one request queue (besides the high-priority one)
TAG_SIZE = 36  # struct virtio_fs_config: u8 tag[36] (UTF-8, NUL-padded), le32 num_request_queues


class FsSpec(NamedTuple):
    """One --fs: a directory pyvmm serves with its own virtiofsd, or a user's daemon's socket."""

    tag: str
    directory: str | None = None
    socket: str | None = None
    read_only: bool = False
    cache: str = "auto"


def parse_fs(spec: str) -> FsSpec:
    """`DIR,TAG[,ro][,cache=MODE]` or `socket=PATH,tag=TAG`."""
    usage = "give DIR,TAG[,ro][,cache=MODE] or socket=PATH,tag=TAG"
    parts = spec.split(",")
    named = dict(p.split("=", 1) for p in parts if "=" in p)
    if "socket" in named:
        if set(named) != {"socket", "tag"} or len(parts) != 2 or not named["socket"] or not named["tag"]:
            raise VmmError(f"--fs {spec!r}: {usage}")
        return FsSpec(tag=named["tag"], socket=named["socket"])
    if len(parts) < 2 or not parts[0] or not parts[1] or "=" in parts[0] or "=" in parts[1]:
        raise VmmError(f"--fs {spec!r}: {usage}")
    # virtiofsd's module (with subprocess and tempfile) is loaded only for an --fs that names one
    from pyvmm.devices.virtio.vhost_user.virtiofsd import CACHE_MODES

    read_only, cache = False, "auto"
    for option in parts[2:]:
        if option == "ro":
            read_only = True
        elif option.startswith("cache=") and option[6:] in CACHE_MODES:
            cache = option[6:]
        else:
            raise VmmError(f"--fs {spec!r}: unknown option {option!r} (ro, cache={'|'.join(CACHE_MODES)})")
    return FsSpec(tag=parts[1], directory=parts[0], read_only=read_only, cache=cache)


def _config(tag: str) -> bytearray:
    raw = tag.encode()
    if not raw or len(raw) > TAG_SIZE or b"\0" in raw:
        raise VmmError(f"virtio-fs tag {tag!r} must be 1 to {TAG_SIZE} bytes without NUL")
    return bytearray(raw.ljust(TAG_SIZE, b"\0") + struct.pack("<I", REQUEST_QUEUES))


class VirtioFs(VhostUserDevice):
    device_id = 26
    name = "fs"
    queue_sizes = (QUEUE_SIZE,) * (1 + REQUEST_QUEUES)  # the high-priority queue, then requests

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--fs", dest="fs", action="append", default=[],
                            metavar="DIR,TAG[,ro][,cache=MODE] | socket=PATH,tag=TAG",
                            help="share a host directory over virtio-fs, served by a virtiofsd pyvmm starts "
                                 "(cache: auto, always, never, metadata) or by yours on a vhost-user socket; "
                                 "mounted in the guest with mount -t virtiofs TAG DIR; repeatable")

    @classmethod
    def from_args(cls, args: argparse.Namespace, host: DeviceHost) -> list[VirtioDevice]:
        specs = [parse_fs(spec) for spec in args.fs]  # every spec checked before a daemon starts
        devices: list[VirtioDevice] = []
        try:
            for spec in specs:
                devices.append(cls.open(spec))
        except BaseException:
            for device in devices:
                device.close()
            raise
        return devices

    @classmethod
    def open(cls, spec: FsSpec) -> VirtioFs:
        """The device `spec` asks for, its daemon started if pyvmm is to run one."""
        what = f"virtio-fs {spec.tag}"
        config = _config(spec.tag)
        if spec.socket is not None:
            return cls(spec.socket, config, what)
        assert spec.directory is not None
        # a daemon of pyvmm's own: only then are subprocess and tempfile loaded (`pyvmm run` starts sooner)
        from pyvmm.devices.virtio.vhost_user import virtiofsd
        from pyvmm.devices.virtio.vhost_user.virtiofsd import Virtiofsd

        tries = virtiofsd.sandboxes(os.geteuid() == 0, virtiofsd.root_is_rootfs())
        for sandbox in tries:
            daemon = Virtiofsd(spec.directory, read_only=spec.read_only, cache=spec.cache, sandbox=sandbox,
                               what=what)
            try:
                device = cls(daemon.socket_path, config, what, daemon)
            except VmmError as e:
                words, ended = daemon.last_words(wait=1.0), daemon.exit_status() is not None
                daemon.stop()
                if ended and sandbox != tries[-1]:
                    continue  # it could not set this sandbox up: the next
                raise VmmError(f"{e} (virtiofsd --sandbox={sandbox}: {words})") from None
            except BaseException:
                daemon.stop()
                raise
            if sandbox == "none":
                logging.getLogger(HOST_NOTES).warning(
                    "%s: virtiofsd runs without a sandbox: this host refuses namespaces to this user", what)
            return device
        raise AssertionError("unreachable: the last sandbox's failure is raised")

    def __init__(self, socket_path: str, config: bytearray, what: str, daemon: Virtiofsd | None = None) -> None:
        self.daemon = daemon
        super().__init__(socket_path, what, on_close=None if daemon is None else daemon.stop)
        self.config = config

    def lost_reason(self) -> str:
        if self.daemon is None:
            return "the virtio-fs daemon closed its vhost-user socket"
        return f"virtiofsd ended ({self.daemon.last_words(wait=1.0)})"

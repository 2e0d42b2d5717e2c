"""virtio-blk (virtio 1.2 §5.2) served by qemu-storage-daemon over vhost-user: a guest's block
requests go from its ring to the daemon and back with no pyvmm code on their way
(vhost_user/device.py says how, vhost_user/storage_daemon.py how the daemon is started). Under
emulation, Python on each request made pyvmm's own disk (blk.py) about 1.4 times as slow per
4 KiB read as kvmtool's.

`-d/--disk FILE[,ro][,nolock][,backend=auto|python|qsd]` is kvmtool's option; its type is this
one, as vhost_net.py's holds `-n`. A disk goes to qemu-storage-daemon where one is installed and
the VM's RAM can be shared with it, to pyvmm's worker otherwise (said in one line); `backend=`
forces either. The image is checked and locked by pyvmm first (blk.open_image()), whoever serves
it, so a bad one is the same one line.

The configuration space is the daemon's (GET_CONFIG): capacity, blk_size, seg_max, topology,
discard and write-zeroes limits as it has them.
"""

from __future__ import annotations

import argparse
import logging
import os
import stat
import struct
from typing import TYPE_CHECKING

from pyvmm.devices.virtio.blk import (
    DISK_USAGE,
    QUEUE_SIZE,
    VIRTIO_BLK_F_BLK_SIZE,
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_F_WRITE_ZEROES,
    DiskSpec,
    VirtioBlk,
    open_image,
    parse_disk,
)
from pyvmm.devices.virtio.device import DeviceHost, VirtioDevice
from pyvmm.devices.virtio.vhost_user.device import VhostUserDevice
from pyvmm.devices.virtio.vhost_user.protocol import PROTOCOL_F_CONFIG
from pyvmm.errors import VmmError
from pyvmm.machine.host import HOST_NOTES

if TYPE_CHECKING:
    from pyvmm.devices.virtio.vhost_user.storage_daemon import StorageDaemon

# struct virtio_blk_config (§5.2.4) up to the write-zeroes fields: what GET_CONFIG asks for. The
# secure-erase and zoned fields after it go with features pyvmm does not offer.
CONFIG_SIZE = 60
CONFIG = struct.Struct("<QII4sIBBHIBBHIIIII")  # capacity .. max_write_zeroes_seg (56 bytes), then 4 more

# The device bits a guest may get from the daemon: each one's fields are in the bytes pyvmm read,
# and none needs a message pyvmm does not relay. Left out: SIZE_MAX (the daemon says 0, "no
# limit", which Linux would take as a limit of 0 bytes); CONFIG_WCE (the guest's writes to `wce`
# would need SET_CONFIG; without it a driver sees a write-back cache and flushes, which the
# daemon's default write cache wants); MQ (one queue); GEOMETRY, BARRIER, SCSI, LIFETIME,
# SECURE_ERASE, ZONED. DISCARD and WRITE_ZEROES only on a writable disk.
SAFE_FEATURES = (VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_RO | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH
                 | VIRTIO_BLK_F_TOPOLOGY | VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES)
WRITE_FEATURES = VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES
MTE_SHARED_KERNEL = (6, 2)  # before it, KVM refuses an MTE guest shared RAM (vm.py's add_memory)


def guest_features(offered: int, read_only: bool) -> int:
    """The device bits a guest is offered of those the daemon `offered`."""
    features = offered & SAFE_FEATURES
    return features & ~WRITE_FEATURES if read_only else features


def capacity(config: bytes | bytearray) -> int:
    """The disk's size in 512-byte sectors, from its configuration space."""
    return int(CONFIG.unpack_from(config)[0])


def shared_ram_refusal(release: str, mte: bool) -> str | None:
    """Why this VM's RAM could not be shared with a daemon, or None: before Linux 6.2, KVM takes
    no shared RAM for a guest with MTE (`mte`: the guest may get it)."""
    try:
        version = tuple(int(part) for part in release.split("-")[0].split(".")[:2])
    except ValueError:
        return None
    if mte and version < MTE_SHARED_KERNEL:
        return f"Linux {release} shares no RAM with an MTE guest (< 6.2; --disable-mte lifts it)"
    return None


def host_has_mte(cpuinfo: str = "/proc/cpuinfo") -> bool:
    try:
        with open(cpuinfo) as f:
            return any(line.startswith("Features") and " mte" in line for line in f)
    except OSError:
        return False


def worker_reason(daemon: str | None, ram_refusal: str | None) -> str | None:
    """Why a disk left to pyvmm (backend=auto) goes to its worker, or None: to the daemon."""
    from pyvmm.devices.virtio.vhost_user.storage_daemon import NAME, PACKAGE

    if daemon is None:
        return f"no {NAME} ({PACKAGE})"
    return ram_refusal


class VhostUserBlk(VhostUserDevice):
    """A disk served by qemu-storage-daemon; its type also holds `-d`, whose disks go to the
    daemon where they can (open_disks)."""

    device_id = 2
    name = "blk"
    queue_sizes = (QUEUE_SIZE,)  # as pyvmm's own disk's
    protocol_features = PROTOCOL_F_CONFIG
    device_features = SAFE_FEATURES

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("-d", "--disk", action="append", default=[], metavar=DISK_USAGE,
                            help="a raw disk image as virtio-blk (vda, vdb, ...); ro: read-only; nolock: do not "
                                 "lock it against other users; served by qemu-storage-daemon where installed, "
                                 "else by pyvmm (backend= forces either); repeatable")

    @classmethod
    def from_args(cls, args: argparse.Namespace, host: DeviceHost) -> list[VirtioDevice]:
        specs = [parse_disk(spec) for spec in args.disk]  # every spec checked before a daemon starts
        if not specs:
            return []
        mte = not getattr(args, "disable_mte", False) and not getattr(args, "aarch32", False) and host_has_mte()
        return open_disks(specs, shared_ram_refusal(os.uname().release, mte))

    @classmethod
    def open(cls, spec: DiskSpec) -> VhostUserBlk:
        """The disk `spec` names, checked and locked by pyvmm, its daemon started: with io_uring,
        or with threads where it ends before it answers (storage_daemon.AIO_MODES)."""
        from pyvmm.devices.virtio.vhost_user.storage_daemon import AIO_MODES, NAME, StorageDaemon

        what = f"virtio-blk {spec.path}"
        fd, _ = open_image(spec.path, spec.read_only, spec.lock)
        try:
            block_device = stat.S_ISBLK(os.fstat(fd).st_mode)
            for aio in AIO_MODES:
                daemon = StorageDaemon(spec.path, read_only=spec.read_only, block_device=block_device, aio=aio,
                                       what=what)
                try:
                    return cls(daemon, fd, spec.read_only, what)
                except VmmError as e:
                    words, ended = daemon.last_words(wait=1.0), daemon.exit_status() is not None
                    daemon.stop()
                    if ended and aio != AIO_MODES[-1]:
                        continue  # it could not set this up: the next
                    raise VmmError(f"{e} ({NAME} aio={aio}: {words})") from None
                except BaseException:
                    daemon.stop()
                    raise
            raise AssertionError("unreachable: the last mode's failure is raised")
        except BaseException:
            os.close(fd)
            raise

    def __init__(self, daemon: StorageDaemon, image_fd: int, read_only: bool, what: str) -> None:
        """The disk `daemon` serves; `image_fd` holds pyvmm's lock on the image till close."""
        self.daemon, self.image_fd, self.read_only = daemon, image_fd, read_only
        super().__init__(daemon.socket_path, what)
        try:
            self.config = bytearray(self.connection.get_config(CONFIG_SIZE))
        except BaseException:
            super().close()
            raise
        self.features = guest_features(self.offered, read_only)
        self.sectors = capacity(self.config)

    def lost_reason(self) -> str:
        from pyvmm.devices.virtio.vhost_user.storage_daemon import NAME

        return f"{NAME} ended ({self.daemon.last_words(wait=1.0)})"

    def close(self) -> None:
        """The daemon ends (flushing the image), then pyvmm lets go of the image and its lock."""
        super().close()
        self.daemon.stop()
        os.close(self.image_fd)


def open_disks(specs: list[DiskSpec], ram_refusal: str | None) -> list[VirtioDevice]:
    """The disks `specs` ask for: on qemu-storage-daemon where it can serve them, else on pyvmm's
    worker, said in one line; `ram_refusal`: why the VM's RAM cannot be shared, if it cannot."""
    from pyvmm.devices.virtio.vhost_user import storage_daemon

    daemon = storage_daemon.find() if any(s.backend != "python" for s in specs) else None
    why = worker_reason(daemon, ram_refusal)
    for spec in specs:
        if spec.backend == "qsd" and why is not None:
            raise VmmError(f"disk {spec.path}: backend=qsd, but {why}")
    devices: list[VirtioDevice] = []
    try:
        for spec in specs:
            if spec.backend == "python" or spec.backend == "auto" and why is not None:
                devices.append(VirtioBlk(spec.path, spec.read_only, spec.lock))
            else:
                devices.append(VhostUserBlk.open(spec))
    except BaseException:
        for device in devices:
            device.close()
        raise
    if why is not None and any(s.backend == "auto" for s in specs):
        logging.getLogger(HOST_NOTES).warning("virtio-blk: pyvmm's worker serves the disks: %s", why)
    return devices

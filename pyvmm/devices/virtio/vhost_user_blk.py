"""virtio-blk (virtio 1.2 §5.2) served by qemu-storage-daemon over vhost-user, for
`-d FILE,backend=qsd`: a guest's block requests go from its ring to the daemon and back with no
pyvmm code on their way (vhost_user/device.py says how, vhost_user/storage_daemon.py how the
daemon is started). The interrupt's InterruptStatus load is still one exit, which the vCPU loop
answers as a hot register.

It is not the default. Measured in the emulated host, one 4 KiB O_DIRECT read at a time costs the
same on the daemon as on pyvmm's worker in one boot (3.8 ms a request either way): the exits of a
request, not the device's work, are what it costs under emulation. The worker needs no second
process and answers a malformed ring with DEVICE_NEEDS_RESET, where libvhost-user drops the
connection and the run ends (lost_reason). The daemon is there for what it brings: io_uring,
discard and write-zeroes, and no share of the GIL.

`-d/--disk FILE[,ro][,nolock][,backend=python|qsd]` is kvmtool's option; its type is this one, as
vhost_net.py's holds `-n`. The image is checked and locked by pyvmm first (blk.open_image()),
whoever serves it, so a bad one is the same one line. The configuration space is the daemon's
(GET_CONFIG): capacity, blk_size, seg_max, topology, discard and write-zeroes limits.
"""

from __future__ import annotations

import argparse
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
    """Why the daemon cannot serve a disk here, or None: it can."""
    from pyvmm.devices.virtio.vhost_user.storage_daemon import NAME, PACKAGE

    if daemon is None:
        return f"no {NAME} ({PACKAGE})"
    return ram_refusal


class VhostUserBlk(VhostUserDevice):
    """A disk served by qemu-storage-daemon; its type also holds `-d`, whose disks go to pyvmm's
    worker unless backend=qsd (open_disks)."""

    device_id = 2
    name = "blk"
    queue_sizes = (QUEUE_SIZE,)  # as pyvmm's own disk's
    protocol_features = PROTOCOL_F_CONFIG
    device_features = SAFE_FEATURES

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("-d", "--disk", action="append", default=[], metavar=DISK_USAGE,
                            help="a raw disk image as virtio-blk (vda, vdb, ...); ro: read-only; nolock: do not "
                                 "lock it against other users; backend=qsd: served by qemu-storage-daemon "
                                 "over vhost-user, not by pyvmm's worker; repeatable")

    @classmethod
    def from_args(cls, args: argparse.Namespace, host: DeviceHost) -> list[VirtioDevice]:
        specs = [parse_disk(spec) for spec in args.disk]  # every spec checked before a daemon starts
        if not specs:
            return []
        if not any(s.backend == "qsd" for s in specs):
            return open_disks(specs, None)
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
        """The daemon ended, or it hung up on pyvmm while it runs on: libvhost-user drops the
        connection of a front-end whose guest broke a ring's rules (vu_panic), and this disk's
        run ends there, in one line, rather than with DEVICE_NEEDS_RESET as pyvmm's worker's."""
        from pyvmm.devices.virtio.vhost_user.storage_daemon import NAME

        words = self.daemon.last_words(wait=1.0)
        if self.daemon.exit_status() is None:
            return f"{NAME} dropped the connection, as it does when the guest breaks a ring's rules ({words})"
        return f"{NAME} ended ({words})"

    def close(self) -> None:
        """The daemon ends (flushing the image), then pyvmm lets go of the image and its lock."""
        super().close()
        self.daemon.stop()
        os.close(self.image_fd)


def open_disks(specs: list[DiskSpec], ram_refusal: str | None) -> list[VirtioDevice]:
    """The disks `specs` ask for: on pyvmm's worker, or on qemu-storage-daemon (backend=qsd),
    which is one line where it cannot serve them; `ram_refusal`: why the VM's RAM cannot be
    shared, if it cannot."""
    from pyvmm.devices.virtio.vhost_user import storage_daemon

    if any(s.backend == "qsd" for s in specs):
        why = worker_reason(storage_daemon.find(), ram_refusal)
        for spec in specs:
            if spec.backend == "qsd" and why is not None:
                raise VmmError(f"disk {spec.path}: backend=qsd, but {why}")
    devices: list[VirtioDevice] = []
    try:
        for spec in specs:
            if spec.backend == "qsd":
                devices.append(VhostUserBlk.open(spec))
            else:
                devices.append(VirtioBlk(spec.path, spec.read_only, spec.lock))
    except BaseException:
        for device in devices:
            device.close()
        raise
    return devices

"""qemu-storage-daemon, QEMU's block layer without a machine (docs/tools/qemu-storage-daemon.rst),
started by pyvmm to serve a `-d` disk as a vhost-user-blk back-end: the guest's block requests go
from its ring to the daemon and back with no pyvmm code on their way. Debian packages it in
qemu-utils from QEMU 8.0 on (Debian 13; bookworm-backports on Debian 12).

One daemon per disk, started as virtiofsd is (daemon.py): its listening socket made by pyvmm and
handed over by number (`addr.type=fd`). The image is the file driver's own node, exported as it is:
raw, never probed for a format. What pyvmm chose for it (command()):

- `cache.direct=off`: reads and writes go through the host's page cache, as pyvmm's own worker
  and kvmtool do theirs, so a guest's O_DIRECT read of a cached block is a copy, not a device
  read; what reaches the disk is the guest's FLUSH (the export's default write cache is on).
- `aio=io_uring`, or `aio=threads` where the daemon cannot set io_uring up (it ends at once, and
  is started again: AIO_MODES; io_uring_disabled, or a container's seccomp, refuse it). One
  4 KiB read at a time from the page cache, kick to interrupt, took a median 22 us with
  io_uring (the read completes as it is submitted) and 33 us with the thread pool's hand-off
  (x86-64, Linux 6.18, QEMU 10.0; pyvmm's worker: 24 us). With `cache.direct=on` both were
  about 100 us more.
- `locking=off`: pyvmm locks the image itself, one whole-file OFD lock on its own descriptor for
  the disk's life (blk.py's lock_image, which `,nolock` skips), so a second user gets pyvmm's one
  line before a daemon starts. QEMU's own locks would conflict with that one, and an export's
  are weaker: it shares write permission, so a second writer would not be refused.
- `discard=unmap` for an image file: a guest's discard punches a hole in it, which stays sparse;
  `discard=ignore` for a block device, whose discards would reach the host's disk (BLKDISCARD),
  which neither pyvmm's worker nor kvmtool does.

The daemon does not end when its client goes, so pyvmm ends it (stop()), and it is sent SIGTERM
should pyvmm die first (prctl PR_SET_PDEATHSIG, set by the thread that starts it: start it from
a thread that lives as long as the disk, as `pyvmm run`'s main thread does).
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Callable

from kvm_bindings import libc
from pyvmm.devices.virtio.vhost_user.daemon import Daemon
from pyvmm.errors import VmmError

NAME = "qemu-storage-daemon"
PLACES = ("/usr/bin/qemu-storage-daemon",)  # $PYVMM_QEMU_STORAGE_DAEMON, then PATH, first
PACKAGE = "Debian's qemu-utils from QEMU 8.0 on: Debian 13, or bookworm-backports on Debian 12"
AIO_MODES = ("io_uring", "threads")  # tried in turn
NODE = "disk"  # the block node's name and the export's id: one disk per daemon
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def find() -> str | None:
    """The qemu-storage-daemon to run, or None where there is none."""
    chosen = os.environ.get("PYVMM_QEMU_STORAGE_DAEMON")
    if chosen:
        return chosen if os.access(chosen, os.X_OK) else None
    found = shutil.which(NAME)
    if found:
        return found
    return next((p for p in PLACES if os.access(p, os.X_OK)), None)


def quoted(value: str) -> str:
    """An option value as QEMU's key=value syntax reads it (a comma is written twice)."""
    return value.replace(",", ",,")


def command(binary: str, image: str, *, read_only: bool, block_device: bool, aio: str, listen_fd: int) -> list[str]:
    """The daemon's command line for `image` (a file, or a block device: QEMU's host_device
    driver), served on the listening socket `listen_fd`, its I/O done by `aio`."""
    driver = "host_device" if block_device else "file"
    return [binary,
            "--blockdev", f"driver={driver},node-name={NODE},filename={quoted(image)},cache.direct=off,aio={aio},"
                          f"locking=off,discard={'ignore' if block_device else 'unmap'},read-only={'on' if read_only else 'off'}",
            "--export", f"type=vhost-user-blk,id={NODE},node-name={NODE},addr.type=fd,addr.str={listen_fd},"
                        f"writable={'off' if read_only else 'on'},num-queues=1"]


def _die_with_parent(prctl: Callable[..., int] = libc.prctl) -> None:
    """In the child, before exec: SIGTERM when the thread that started it ends. prctl is looked
    up here, in the parent, as the default: the child of a threaded parent must not import or
    take a lock (cffi's, on a first lookup) that another thread may have held at the fork."""
    prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class StorageDaemon(Daemon):
    """One qemu-storage-daemon serving `image` (raw) on a fresh socket (`socket_path`)."""

    def __init__(self, image: str, *, read_only: bool, block_device: bool = False, aio: str = AIO_MODES[0],
                 what: str) -> None:
        binary = find()
        if binary is None:
            raise VmmError(f"{what}: {NAME} is not installed or not executable ({PACKAGE}; "
                           "or set PYVMM_QEMU_STORAGE_DAEMON)")
        super().__init__("pyvmm-qsd-")
        self.what, self.aio = what, aio
        self.start(lambda fd: command(binary, image, read_only=read_only, block_device=block_device, aio=aio,
                                      listen_fd=fd), what, _die_with_parent)

    def stop(self, terminate: bool = True) -> None:
        """End the daemon (SIGTERM: it finishes its requests, flushes the image and exits; it
        would outlive pyvmm's connection) and clean up."""
        super().stop(terminate)

"""How the host's files reach a LinuxSession's guest (session.py): the root share and the
--rwdir shares over virtio-fs (virtiofsd) or virtio-9p, and the part of the guest's setup script
that mounts them."""

from __future__ import annotations

import logging
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pyvmm.errors import VmmError
from pyvmm.exec import initramfs

if TYPE_CHECKING:
    from pyvmm.devices.virtio.device import VirtioDevice
    from pyvmm.devices.virtio.p9 import Virtio9p

log = logging.getLogger("pyvmm")

MSIZE = 512000  # Linux 6.12's virtio transport maximum (PAGE_SIZE * (VIRTQUEUE_NUM - 3)); more is cut with a warning
NINEP = f"trans=virtio,version=9p2000.L,msize={MSIZE}"


SHARES = ("auto", "9p", "fs")


def choose_share(asked: str, modules: Path | None) -> str:
    """`--share`: "fs" (virtio-fs through virtiofsd) or "9p"; "auto" takes virtio-fs where the
    host has virtiofsd and the kernel's module tree has virtiofs."""
    from pyvmm.devices.virtio.vhost_user import virtiofsd

    if asked not in SHARES:
        raise VmmError(f"--share {asked!r}: give {', '.join(SHARES)}")
    if asked == "fs" and virtiofsd.find() is None:
        raise VmmError("--share fs: virtiofsd is not installed (Debian 13, Ubuntu 24.04: apt install virtiofsd)")
    if asked == "auto":
        return "fs" if virtiofsd.find() is not None and initramfs.kernel_offers(modules, "virtiofs") else "9p"
    return asked


def setup_script(rwdirs: Sequence[str], share: str = "9p") -> bytes:
    """What the init sources once the control share is mounted: the guest's file systems."""
    q = shlex.quote
    if share == "fs":
        root = "mount -t virtiofs -o ro pyvmm-root $R || die 'cannot mount the host root over virtio-fs'"
    else:
        root = f"mount -t 9p -o {NINEP},ro,cache=loose pyvmm-root $R || die 'cannot mount the host root over 9p'"
    lines = [
        "R=/newroot",
        root,
        "for d in tmp var/tmp; do [ -d $R/$d ] && mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs $R/$d; done",
        "[ -d $R/run ] || die 'the host root has no /run'",
        "mount -t tmpfs -o mode=755,nosuid,nodev tmpfs $R/run",
        "mount -t proc proc $R/proc && mount -t sysfs sysfs $R/sys && mount -t devtmpfs devtmpfs $R/dev"
        " || die 'cannot mount /proc, /sys and /dev'",
        "mkdir -p $R/dev/pts $R/dev/shm && mount -t devpts devpts $R/dev/pts && mount -t tmpfs tmpfs $R/dev/shm",
        "mkdir -p $R/run/pyvmm/ctl && cp /bin/busybox $R/run/pyvmm/busybox && mount --bind /ctl $R/run/pyvmm/ctl"
        " || die 'cannot prepare /run/pyvmm'",
    ]
    mount = "mount -t virtiofs" if share == "fs" else f"mount -t 9p -o {NINEP}"
    for i, d in enumerate(rwdirs):
        lines.append(f"mkdir -p $R{q(d)} 2>/dev/null; {mount} pyvmm-rw{i} $R{q(d)}"
                     f" || die {q(f'cannot mount --rwdir {d}')}")
    return ("\n".join(lines) + "\n").encode()


def share_devices(share: str, rwdirs: Sequence[str],
                  fallback: bool = False) -> tuple[list[VirtioDevice], Virtio9p | None, str]:
    """The root share and one per --rwdir over virtio-fs ("fs") or virtio-9p, the 9p root's
    device (its request count) if it is 9p, and which it is: `fallback`, 9p where virtio-fs
    could not start (a virtiofsd that ends at once, whatever its sandbox). virtio-fs: the root
    with virtiofsd's --cache always (it does not change under a session), each --rwdir with
    --cache never (coherent)."""
    from pyvmm.devices.virtio.p9 import Virtio9p

    if share == "fs":
        try:
            return _virtio_fs(rwdirs), None, "fs"
        except VmmError as e:
            if not fallback:
                raise
            log.info("virtio-fs did not start, the host's files go over 9p: %s", e)
    root = Virtio9p("/", "pyvmm-root", read_only=True, opaque=frozenset({"proc", "sys", "dev"}))
    shares: list[VirtioDevice] = [root]
    try:
        shares += [Virtio9p(d, f"pyvmm-rw{i}") for i, d in enumerate(rwdirs)]
    except BaseException:
        root.close()
        raise
    return shares, root, "9p"


def _virtio_fs(rwdirs: Sequence[str]) -> list[VirtioDevice]:
    from pyvmm.devices.virtio.fs import FsSpec, VirtioFs

    shares: list[VirtioDevice] = []
    try:
        shares.append(VirtioFs.open(FsSpec("pyvmm-root", "/", read_only=True, cache="always")))
        for i, d in enumerate(rwdirs):
            shares.append(VirtioFs.open(FsSpec(f"pyvmm-rw{i}", d, cache="never")))
    except BaseException:
        for device in shares:
            device.close()
        raise
    return shares

"""virtio-blk on a raw image file (virtio 1.2 §5.2), `-d/--disk FILE[,ro][,nolock]`.

Requests go straight between the image and guest RAM: preadv/pwritev with the request's guest
buffers as the I/O vector, no copy in between. FLUSH is fsync(2). A read-only disk is opened
O_RDONLY, offers VIRTIO_BLK_F_RO, and fails every write with IOERR. An image is locked against
a second user (shared for `ro`, exclusive otherwise: lock_image()); `nolock` opts out.

This is the disk pyvmm's worker thread serves, `-d`'s default; `backend=qsd` gives a disk to
qemu-storage-daemon instead (vhost_user_blk.py, which holds the option: it must reach both
types, and this module may not import it back). Both read the option with parse_disk() and check
the image with open_image(), so a bad one gets the same line whichever serves it.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import struct
from collections.abc import Callable
from typing import NamedTuple

from kvm_bindings import ffi, libc
from pyvmm.devices.virtio.device import VirtioDevice
from pyvmm.devices.virtio.rings.chain import Chain, QueueError
from pyvmm.devices.virtio.rings.layout import IOVEC
from pyvmm.devices.virtio.rings.queue import Virtqueue
from pyvmm.errors import VmmError

log = logging.getLogger("pyvmm")

SECTOR = 512
QUEUE_SIZE = 256
SEG_MAX = QUEUE_SIZE - 2  # data segments per request: the queue minus header and status

# Feature bits (§5.2.3)
VIRTIO_BLK_F_SEG_MAX = 1 << 2
VIRTIO_BLK_F_RO = 1 << 5
VIRTIO_BLK_F_BLK_SIZE = 1 << 6
VIRTIO_BLK_F_FLUSH = 1 << 9
VIRTIO_BLK_F_TOPOLOGY = 1 << 10
VIRTIO_BLK_F_DISCARD = 1 << 13
VIRTIO_BLK_F_WRITE_ZEROES = 1 << 14

# Request types and status (§5.2.6)
VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID = 0, 1, 4, 8
VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP = 0, 1, 2
ID_BYTES = 20  # VIRTIO_BLK_ID_BYTES
HEADER = struct.Struct("<IIQ")  # struct virtio_blk_req: le32 type, le32 reserved, le64 sector


BACKENDS = ("python", "qsd")  # who serves a disk: pyvmm's worker (the default), qemu-storage-daemon
DISK_USAGE = "FILE[,ro][,nolock][,backend=python|qsd]"


class DiskSpec(NamedTuple):
    """One -d: the image, how it is opened, and who is to serve it (BACKENDS)."""

    path: str
    read_only: bool = False
    lock: bool = True
    backend: str = "python"


def parse_disk(spec: str) -> DiskSpec:
    """`FILE[,ro][,nolock][,backend=python|qsd]` as the CLI takes it."""
    path, *opts = spec.split(",")
    backend = "python"
    for o in opts:
        if o.startswith("backend=") and o[8:] in BACKENDS:
            backend = o[8:]
        elif o not in ("ro", "nolock"):
            raise VmmError(f"disk {spec!r}: unknown option {o!r} ({DISK_USAGE})")
    if not path:
        raise VmmError(f"disk {spec!r} names no file")
    return DiskSpec(path, "ro" in opts, "nolock" not in opts, backend)


def open_image(path: str, read_only: bool, lock: bool) -> tuple[int, int]:
    """Open a disk image as a disk (a file or a block device of at least a sector), locked
    unless `lock` is false: (its descriptor, its size). Every way it cannot be one is one line."""
    try:
        fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
    except OSError as e:
        raise VmmError(f"disk {path}: {e.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise VmmError(f"disk {path} is not a file or a block device")
        if lock:
            lock_image(fd, path, shared=read_only)
        try:
            size = os.lseek(fd, 0, os.SEEK_END)  # files and block devices alike
        except OSError as e:
            raise VmmError(f"disk {path}: cannot tell its size: {e.strerror}") from None
        if size < SECTOR:
            raise VmmError(f"disk {path} is smaller than one {SECTOR}-byte sector")
    except BaseException:
        os.close(fd)
        raise
    return fd, size


def lock_image(fd: int, path: str, shared: bool) -> None:
    """Lock the whole image against other users, as QEMU does (it locks single bytes per
    permission, in the same OFD lock space, so a whole-file lock of pyvmm's conflicts with a
    writer QEMU as it should): an open file description lock (F_OFD_SETLK, fcntl(2)), shared
    for a read-only disk, exclusive otherwise. It goes with the fd, whichever thread holds it;
    any other open of the image with a conflicting lock is refused, in this process too (the
    same image given twice)."""
    lock = ffi.new("struct flock *", {"l_type": fcntl.F_RDLCK if shared else fcntl.F_WRLCK,
                                      "l_whence": os.SEEK_SET, "l_start": 0, "l_len": 0})
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, bytes(ffi.buffer(lock)))
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES):
            raise VmmError(f"disk {path}: cannot lock it: {e.strerror} (add ,nolock to use it unlocked)") from None
        user = "writes to it" if shared else "uses it"
        raise VmmError(f"disk {path} is locked: another process, or another -d of this one, {user} "
                       "(add ,nolock to use it anyway)") from None


class VirtioBlk(VirtioDevice):
    device_id = 2
    name = "blk"
    queue_sizes = (QUEUE_SIZE,)

    def __init__(self, path: str, read_only: bool = False, lock: bool = True) -> None:
        """`lock`: refuse an image another process uses, and keep others from using this one."""
        super().__init__()
        self.path, self.read_only = path, read_only
        self.fd, size = open_image(path, read_only, lock)
        self.sectors = size // SECTOR
        self.features = VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH
        if read_only:
            self.features |= VIRTIO_BLK_F_RO
        # struct virtio_blk_config (§5.2.4): capacity, size_max, seg_max, geometry, blk_size
        self.config = bytearray(struct.pack("<QII4sI", self.sectors, 0, SEG_MAX, b"", SECTOR))
        self.serial = os.path.basename(path).encode()[:ID_BYTES]
        self.flushes = 0  # FLUSH requests served (tests and statistics)

    def notify(self, queue: Virtqueue) -> None:
        self.serve(queue, self._request)

    def _request(self, chain: Chain) -> int:
        """Serve one request (§5.2.6: a header, data, a status byte at the very end); returns
        the bytes written to the driver's buffers. The data moves in one preadv/pwritev
        straight between the image and the chain's iovec.

        Reads and writes framed as Linux frames them, the header and the status byte each a
        buffer of their own, take a short road: one struct unpack of the header from guest
        RAM, the buffers between handed to the kernel as they are, the status stored in place.
        Everything else (another framing, FLUSH, GET_ID, a write to a read-only disk) goes by
        chain offset."""
        framed = chain.framed(HEADER.size, 1)
        if framed is not None:
            header, data, status = framed
            kind, _, sector = HEADER.unpack(header)
            if kind == VIRTIO_BLK_T_IN and chain.nr_readable == 1:  # all writable but the header
                status[0], written = self._transfer(libc.preadv, data, chain.total - HEADER.size - 1, sector)
                return written + 1
            if kind == VIRTIO_BLK_T_OUT and not self.read_only and chain.readable_len == chain.total - 1:
                status[0] = self._transfer(libc.pwritev, data, chain.readable_len - HEADER.size, sector)[0]
                return 1
        return self._request_by_offset(chain)

    def _request_by_offset(self, chain: Chain) -> int:
        """_request for any framing the driver chooses (§2.6.4)."""
        data_end = chain.total - 1  # the status byte is the chain's last
        if chain.readable_len < HEADER.size or chain.writable_len < 1:
            raise QueueError(f"block request {chain.head} lacks its header or status byte")
        kind, _, sector = HEADER.unpack(chain.read(0, HEADER.size))
        written = 0
        if kind == VIRTIO_BLK_T_IN:  # into the writable bytes before the status
            status, written = self._io(libc.preadv, chain, chain.readable_len, data_end, sector)
        elif kind == VIRTIO_BLK_T_OUT:  # from the readable bytes after the header
            status = VIRTIO_BLK_S_IOERR if self.read_only else \
                self._io(libc.pwritev, chain, HEADER.size, chain.readable_len, sector)[0]
        elif kind == VIRTIO_BLK_T_FLUSH:
            status = self._flush()
        elif kind == VIRTIO_BLK_T_GET_ID:
            room = data_end - chain.readable_len
            serial = self.serial.ljust(ID_BYTES, b"\0")[:room]
            status, written = VIRTIO_BLK_S_OK, chain.write(chain.readable_len, serial)
        else:
            status = VIRTIO_BLK_S_UNSUPP
        chain.write(data_end, bytes((status,)))
        return written + 1

    def _io(self, call: Callable[..., int], chain: Chain, start: int, end: int, sector: int) -> tuple[int, int]:
        """preadv or pwritev of chain bytes [start, end) at `sector`: (status, bytes moved)."""
        return self._transfer(call, chain.iov_range(start, end)[0], end - start, sector)

    def _transfer(self, call: Callable[..., int], iov: bytes, length: int, sector: int) -> tuple[int, int]:
        """preadv or pwritev of `length` bytes at `sector` through `iov` (struct iovec[], as
        bytes: cffi passes their buffer as the const void * argument, no copy): (status, bytes
        moved)."""
        if length % SECTOR or sector + length // SECTOR > self.sectors:
            return VIRTIO_BLK_S_IOERR, 0  # whole sectors, all inside the disk
        done = call(self.fd, iov, len(iov) // IOVEC.size, sector * SECTOR) if iov else 0
        # a regular file transfers all or fails; less means it shrank under us or a device error
        return (VIRTIO_BLK_S_OK, done) if done == length else (VIRTIO_BLK_S_IOERR, max(done, 0))

    def _flush(self) -> int:
        self.flushes += 1
        if self.read_only:
            return VIRTIO_BLK_S_OK
        try:
            os.fsync(self.fd)
        except OSError:
            return VIRTIO_BLK_S_IOERR
        return VIRTIO_BLK_S_OK

    def close(self) -> None:
        """What the guest wrote reaches the disk before the image is let go."""
        if not self.read_only:
            try:
                os.fsync(self.fd)
            except OSError as e:
                log.warning("disk %s: flushing it failed: %s", self.path, e.strerror)
        os.close(self.fd)


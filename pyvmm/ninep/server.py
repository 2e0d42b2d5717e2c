"""A 9P2000.L file server on one host directory, for virtio-9p (virtio 1.2 §5.16 names the
device; the protocol is protocol.py's).

Confinement is by construction, as QEMU's 9p "local" backend does it: a fid is a path of names
below the shared directory, never a host path string, and every operation reaches its object by
walking those names from the shared directory's descriptor with openat(2) and O_NOFOLLOW, one
component at a time. So the server never follows a symlink (the guest reads its target and
resolves it in its own namespace), `..` is taken from the fid's own names (at the root it stays
there, as 9P requires), a name can hold no `/`, and a component swapped for a symlink by a racing
rename fails with ELOOP or ENOTDIR instead of leading out. Where a call would follow a symlink
by name (chmod), it acts on an O_PATH descriptor of the checked object instead.

Only regular files and directories are opened on the host: a guest opens device nodes, FIFOs and
sockets it finds in the share as its own (Linux's v9fs makes them special inodes), so the host's
are never touched. A read-only share refuses every change with EROFS, whatever the guest mounts.
Reads and writes go straight between the file and guest RAM (preadv/pwritev on the request's
buffers). Every count, name and fid the guest sends is bounded.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

from pyvmm.devices.virtio.rings.buffers import fill, gather
from pyvmm.ninep import protocol as p
from pyvmm.ninep.files import FileOps
from pyvmm.ninep.names import NameOps
from pyvmm.ninep.protocol import ProtocolError, Reader, Writer
from pyvmm.ninep.share import (
    MAX_MSIZE,
    MIN_MSIZE,
    WRITE_HEADER,
    Fail,
    Fid,
)


class FileServer(FileOps, NameOps):
    """Serves one host directory (`root`) to one 9P client."""

    def __init__(self, root: str, *, read_only: bool, opaque: frozenset[str] = frozenset()) -> None:
        """`opaque`: names of directories right below the root that are served empty, to be
        mounted over by the guest (the host's /proc, /sys and /dev when the share is /: their
        files can block a reader for ever, or are not the guest's business)."""
        super().__init__(root, read_only=read_only, opaque=opaque)
        self._handlers: dict[int, Callable[[int, Reader], bytes]] = {
            p.TVERSION: self._version, p.TATTACH: self._attach, p.TAUTH: self._auth, p.TFLUSH: self._flush,
            p.TWALK: self._walk, p.TCLUNK: self._clunk, p.TGETATTR: self._getattr, p.TSETATTR: self._setattr,
            p.TLOPEN: self._lopen, p.TLCREATE: self._lcreate, p.TREADDIR: self._readdir,
            p.TSTATFS: self._statfs, p.TREADLINK: self._readlink, p.TMKDIR: self._mkdir,
            p.TSYMLINK: self._symlink, p.TMKNOD: self._mknod, p.TLINK: self._link,
            p.TRENAME: self._rename, p.TRENAMEAT: self._renameat, p.TUNLINKAT: self._unlinkat,
            p.TREMOVE: self._remove, p.TFSYNC: self._fsync, p.TLOCK: self._lock, p.TGETLOCK: self._getlock,
            p.TXATTRWALK: self._unsupported, p.TXATTRCREATE: self._unsupported,
        }

    def handle(self, readable: list[memoryview], writable: list[memoryview]) -> int:
        """Serve the T-message in `readable`, write the R-message into `writable`; returns its
        length (0: no reply can be given, as for a message too short to hold a tag)."""
        head = gather(readable, WRITE_HEADER)
        if len(head) < p.HEADER.size:
            return 0
        size, mtype, tag = p.HEADER.unpack_from(head)
        room = sum(len(b) for b in writable)
        try:
            if size < p.HEADER.size or size > self.msize or size > sum(len(b) for b in readable):
                raise ProtocolError(f"message size {size}")
            if mtype == p.TREAD:
                return self._read(tag, Reader(head[:size]), writable, room)
            if mtype == p.TWRITE:
                reply = self._write(tag, Reader(head), readable, size)
            else:
                handler = self._handlers.get(mtype)
                if handler is None:
                    raise Fail(errno.EOPNOTSUPP)
                reply = handler(tag, Reader(gather(readable, size)))
        except Fail as e:
            reply = p.error_reply(tag, e.errno)
        except OSError as e:
            reply = p.error_reply(tag, e.errno or errno.EIO)
        except (ProtocolError, ValueError):  # ValueError: os.* refusing a name with a NUL
            reply = p.error_reply(tag, errno.EINVAL)
        if len(reply) > room:
            reply = p.error_reply(tag, errno.EMSGSIZE)
            if len(reply) > room:
                return 0
        fill(writable, reply)
        return len(reply)

    def _version(self, tag: int, r: Reader) -> bytes:
        msize, version = r.u32(), r.string()
        self.end_session()  # a new session: every fid of the old one is gone
        # version(5): never more than the client's msize; one too small to serve is refused
        agreed = p.VERSION if version == p.VERSION and msize >= MIN_MSIZE else "unknown"
        self.msize = max(MIN_MSIZE, min(msize, MAX_MSIZE))
        return Writer(p.TVERSION + 1, tag).u32(min(msize, self.msize)).string(agreed).finish()

    def _auth(self, tag: int, r: Reader) -> bytes:
        raise Fail(errno.EOPNOTSUPP)  # no authentication: attach with afid = NOFID

    def _attach(self, tag: int, r: Reader) -> bytes:
        number = r.u32()
        r.u32()  # afid
        r.string()  # uname
        r.string()  # aname: one share per device, so there is nothing to choose
        self._new_fid(number)
        qid = self._qid(os.stat(self.root_fd))
        self.fids[number] = Fid(())
        return Writer(p.TATTACH + 1, tag).qid(qid).finish()

    def _flush(self, tag: int, r: Reader) -> bytes:
        r.u16()  # every request is answered before the next is read: nothing is in flight
        return Writer(p.TFLUSH + 1, tag).finish()

    def _unsupported(self, tag: int, r: Reader) -> bytes:
        raise Fail(errno.EOPNOTSUPP)  # extended attributes: none are served


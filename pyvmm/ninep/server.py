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
import fcntl
import os
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from kvm_bindings import ffi
from pyvmm.devices.virtio.rings.buffers import fill, gather, limit, split
from pyvmm.ninep import protocol as p
from pyvmm.ninep.protocol import ProtocolError, Reader, Writer

MAX_OFFSET = (1 << 63) - 1  # off_t: anything larger is EINVAL, as lseek(2) has it
MAX_LISTED = 200_000  # directory entries held for readdir across a share's fids
MAX_MSIZE = 1 << 20  # Linux's virtio transport asks for 512 KiB; larger gains nothing
MIN_MSIZE = 4096
MAX_FIDS = 1 << 16  # a fid without an open file is a few hundred bytes
MAX_OPEN = 1024  # fids with an open host file (file descriptors) per share
NAME_MAX = 255
READ_HEADER = 11  # Rread: size[4] type[1] tag[2] count[4]
WRITE_HEADER = 23  # Twrite: size[4] type[1] tag[2] fid[4] offset[8] count[4]

O_PATH_DIR = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
O_PATH_ANY = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


class Fail(Exception):
    """Answer with Rlerror `errno`."""

    def __init__(self, errno_value: int) -> None:
        super().__init__(errno_value)
        self.errno = errno_value


@dataclass(slots=True)
class Fid:
    names: tuple[str, ...]  # below the shared directory; () is the root
    fd: int = -1  # the open host file, after Tlopen/Tlcreate
    writable: bool = False
    is_dir: bool = False
    entries: list[bytes] | None = None  # a directory's listing, packed, taken at offset 0


def _host_open_flags(flags: int) -> int:
    """P9_DOTL_* open flags as this host's O_* (only those a server should honour)."""
    host = {0: os.O_RDONLY, 1: os.O_WRONLY, 2: os.O_RDWR}.get(flags & p.DOTL_ACCMODE)
    if host is None:
        raise Fail(errno.EINVAL)
    for dotl, o in ((p.DOTL_TRUNC, os.O_TRUNC), (p.DOTL_APPEND, os.O_APPEND), (p.DOTL_EXCL, os.O_EXCL),
                    (p.DOTL_DSYNC, os.O_DSYNC), (p.DOTL_SYNC, os.O_SYNC)):
        if flags & dotl:
            host |= o
    return host


def _check_name(name: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise Fail(errno.EINVAL)
    if len(name.encode("utf-8", "surrogateescape")) > NAME_MAX:
        raise Fail(errno.ENAMETOOLONG)
    return name


class FileServer:
    """Serves one host directory (`root`) to one 9P client."""

    def __init__(self, root: str, *, read_only: bool, opaque: frozenset[str] = frozenset()) -> None:
        """`opaque`: names of directories right below the root that are served empty, to be
        mounted over by the guest (the host's /proc, /sys and /dev when the share is /: their
        files can block a reader for ever, or are not the guest's business)."""
        self.root = root
        self.read_only = read_only
        self.opaque = opaque
        self.listed = 0  # directory entries held in readdir snapshots
        self.root_fd = os.open(root, O_PATH_DIR)
        self.root_dev = os.fstat(self.root_fd).st_dev
        self.msize = 8192
        self.fids: dict[int, Fid] = {}
        self.open_files = 0
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

    def end_session(self) -> None:
        """Forget every fid (Tversion, or the device's reset)."""
        for fid in self.fids.values():
            self._close_file(fid)
        self.fids.clear()

    def close(self) -> None:
        self.end_session()
        os.close(self.root_fd)

    # --- one request -----------------------------------------------------------------------
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

    # --- reaching objects ------------------------------------------------------------------
    def _fid(self, r: Reader) -> Fid:
        fid = self.fids.get(r.u32())
        if fid is None:
            raise Fail(errno.EBADF)
        return fid

    def _new_fid(self, number: int) -> None:
        if number == p.NOFID or number in self.fids:
            raise Fail(errno.EBADF)
        if len(self.fids) >= MAX_FIDS:
            raise Fail(errno.ENFILE)

    @contextmanager
    def _dir(self, names: tuple[str, ...]) -> Iterator[int]:
        """An O_PATH descriptor of the directory `names`, reached without following symlinks."""
        fd = os.open(".", O_PATH_DIR, dir_fd=self.root_fd)
        try:
            for name in names:
                nxt = os.open(name, O_PATH_DIR, dir_fd=fd)
                os.close(fd)
                fd = nxt
            yield fd
        finally:
            os.close(fd)

    @contextmanager
    def _object(self, names: tuple[str, ...]) -> Iterator[int]:
        """An O_PATH descriptor of the object `names` itself (a symlink is not followed)."""
        if not names:
            with self._dir(()) as fd:
                yield fd
            return
        with self._dir(names[:-1]) as parent:
            fd = os.open(names[-1], O_PATH_ANY, dir_fd=parent)
        try:
            yield fd
        finally:
            os.close(fd)

    @contextmanager
    def _parent(self, names: tuple[str, ...]) -> Iterator[tuple[int, str]]:
        """The directory holding `names` and its last name, for the *at(2) calls that act on a
        name without following it; the root is "." in itself."""
        with self._dir(names[:-1]) as parent:
            yield parent, names[-1] if names else "."

    def _lstat(self, names: tuple[str, ...]) -> os.stat_result:
        if not names:
            return os.stat(self.root_fd)
        with self._dir(names[:-1]) as parent:
            return os.stat(names[-1], dir_fd=parent, follow_symlinks=False)

    def _qid(self, st: os.stat_result) -> bytes:
        if stat.S_ISDIR(st.st_mode):
            kind = p.QTDIR
        elif stat.S_ISLNK(st.st_mode):
            kind = p.QTSYMLINK
        else:
            kind = p.QTFILE
        return p.QID.pack(kind, 0, self._qid_path(st.st_dev, st.st_ino))

    def _qid_path(self, dev: int, ino: int) -> int:
        # unique within the share's own file system; a mount below it mixes its device in
        return ino if dev == self.root_dev else (ino ^ (dev << 40) ^ (1 << 63)) & 0xFFFF_FFFF_FFFF_FFFF

    def _writable_share(self) -> None:
        if self.read_only:
            raise Fail(errno.EROFS)

    def _close_file(self, fid: Fid) -> None:
        if fid.fd >= 0:
            os.close(fid.fd)
            fid.fd = -1
            self.open_files -= 1
        self._drop_listing(fid)

    def _drop_listing(self, fid: Fid) -> None:
        if fid.entries is not None:
            self.listed -= len(fid.entries)
            fid.entries = None

    # --- session ---------------------------------------------------------------------------
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

    # --- names -----------------------------------------------------------------------------
    def _walk(self, tag: int, r: Reader) -> bytes:
        number = r.u32()
        fid = self.fids.get(number)
        if fid is None:
            raise Fail(errno.EBADF)
        newfid = r.u32()
        count = r.u16()
        if count > 16:  # P9_MAXWELEM
            raise Fail(errno.EINVAL)
        wnames = [r.string() for _ in range(count)]
        if newfid != number:  # only the fid itself may be reused as newfid
            self._new_fid(newfid)
        if fid.fd >= 0 and count:
            raise Fail(errno.EBADF)  # an open fid cannot be walked from
        names = fid.names
        qids: list[bytes] = []
        for i, name in enumerate(wnames):
            try:
                if name == "..":
                    step = names[:-1]
                elif name == ".":
                    step = names
                else:
                    step = (*names, _check_name(name))
                if len(step) > 1 and step[0] in self.opaque:
                    raise Fail(errno.ENOENT)
                st = self._lstat(step)  # ENOTDIR if `names` is not a directory
            except (Fail, OSError):
                if i == 0:
                    raise
                break  # a partial walk: the qids so far, and newfid is not made (walk(5))
            names = step
            qids.append(self._qid(st))
        if len(qids) == count:
            if newfid == number:
                fid.names = names
            else:
                self.fids[newfid] = Fid(names)
        w = Writer(p.TWALK + 1, tag).u16(len(qids))
        for q in qids:
            w.qid(q)
        return w.finish()

    def _clunk(self, tag: int, r: Reader) -> bytes:
        number = r.u32()
        fid = self.fids.pop(number, None)
        if fid is None:
            raise Fail(errno.EBADF)
        self._close_file(fid)
        return Writer(p.TCLUNK + 1, tag).finish()

    def _getattr(self, tag: int, r: Reader) -> bytes:
        fid = self._fid(r)
        r.u64()  # request mask: everything basic is cheap to give
        st = os.fstat(fid.fd) if fid.fd >= 0 else self._lstat(fid.names)
        w = Writer(p.TGETATTR + 1, tag).u64(p.STATS_BASIC).qid(self._qid(st))
        w.u32(st.st_mode).u32(st.st_uid).u32(st.st_gid).u64(st.st_nlink).u64(st.st_rdev)
        w.u64(st.st_size).u64(st.st_blksize).u64(st.st_blocks)
        for ns in (st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns):
            w.u64(ns // 1_000_000_000).u64(ns % 1_000_000_000)
        w.u64(0).u64(0).u64(0).u64(0)  # btime, gen, data_version: not in the valid mask
        return w.finish()

    def _setattr(self, tag: int, r: Reader) -> bytes:
        fid = self._fid(r)
        valid, mode, uid, gid, size = r.u32(), r.u32(), r.u32(), r.u32(), _offset(r.u64())
        atime = r.u64() * 1_000_000_000 + r.u64()
        mtime = r.u64() * 1_000_000_000 + r.u64()
        if valid & ~p.ATTR_CTIME:  # a ctime-only update is what any change does anyway
            self._writable_share()
        if fid.fd >= 0:  # Linux sends an open file's own fid (ATTR_FILE): it may be unlinked
            self._set(fid.fd, os.fstat(fid.fd), valid, mode, uid, gid, size, atime, mtime, fid)
        else:
            with self._object(fid.names) as fd:
                self._set(fd, os.fstat(fd), valid, mode, uid, gid, size, atime, mtime, fid)
        return Writer(p.TSETATTR + 1, tag).finish()

    def _set(self, fd: int, st: os.stat_result, valid: int, mode: int, uid: int, gid: int, size: int,
             atime: int, mtime: int, fid: Fid) -> None:
        """Tsetattr's changes on the checked object `fd` (an open file, or an O_PATH descriptor,
        reached through its /proc/self/fd magic link: never a name resolved again). A symlink's
        owner and times are set by name without following it (there is no fd call for them)."""
        link = stat.S_ISLNK(st.st_mode)
        if link and valid & (p.ATTR_MODE | p.ATTR_SIZE):
            raise Fail(errno.EOPNOTSUPP)  # a symlink has no mode of its own, nor a size to set
        target = f"/proc/self/fd/{fd}"
        if valid & p.ATTR_MODE:
            os.chmod(target, _safe_mode(mode, stat.S_ISDIR(st.st_mode)))
        owner = (uid if valid & p.ATTR_UID else -1, gid if valid & p.ATTR_GID else -1)
        if valid & (p.ATTR_UID | p.ATTR_GID):
            if link:
                with self._parent(fid.names) as (parent, name):
                    os.chown(name, *owner, dir_fd=parent, follow_symlinks=False)
            else:
                os.chown(target, *owner)
        if valid & p.ATTR_SIZE:
            if not stat.S_ISREG(st.st_mode):
                raise Fail(errno.EISDIR if stat.S_ISDIR(st.st_mode) else errno.EINVAL)
            if fd == fid.fd and fid.writable:
                os.ftruncate(fd, size)
            else:
                wfd = os.open(target, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                try:
                    os.ftruncate(wfd, size)
                finally:
                    os.close(wfd)
        if valid & (p.ATTR_ATIME | p.ATTR_MTIME):
            now = time.time_ns()
            a = (atime if valid & p.ATTR_ATIME_SET else now) if valid & p.ATTR_ATIME else st.st_atime_ns
            m = (mtime if valid & p.ATTR_MTIME_SET else now) if valid & p.ATTR_MTIME else st.st_mtime_ns
            if link:
                with self._parent(fid.names) as (parent, name):
                    os.utime(name, ns=(a, m), dir_fd=parent, follow_symlinks=False)
            else:
                os.utime(target, ns=(a, m))

    def _readlink(self, tag: int, r: Reader) -> bytes:
        fid = self._fid(r)
        if not fid.names:
            raise Fail(errno.EINVAL)
        with self._dir(fid.names[:-1]) as parent:
            target = os.readlink(fid.names[-1], dir_fd=parent)
        return Writer(p.TREADLINK + 1, tag).string(target).finish()

    def _statfs(self, tag: int, r: Reader) -> bytes:
        fid = self._fid(r)
        with self._object(fid.names) as fd:
            s = os.fstatvfs(fd)
        w = Writer(p.TSTATFS + 1, tag).u32(0x01021997)  # V9FS_MAGIC, as Linux's statfs expects
        w.u32(s.f_bsize).u64(s.f_blocks).u64(s.f_bfree).u64(s.f_bavail).u64(s.f_files).u64(s.f_ffree)
        w.u64(s.f_fsid).u32(s.f_namemax)
        return w.finish()

    # --- files -----------------------------------------------------------------------------
    def _lopen(self, tag: int, r: Reader) -> bytes:
        fid = self._fid(r)
        flags = _host_open_flags(r.u32()) & ~os.O_EXCL
        if fid.fd >= 0:
            raise Fail(errno.EBADF)
        writes = flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC
        if writes:
            self._writable_share()
        if self.open_files >= MAX_OPEN:
            raise Fail(errno.EMFILE)
        with self._dir(fid.names[:-1]) as parent:
            name = fid.names[-1] if fid.names else "."
            ofd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
            try:
                st = os.fstat(ofd)
                if stat.S_ISDIR(st.st_mode):
                    if writes:
                        raise Fail(errno.EISDIR)
                    fd = os.open(f"/proc/self/fd/{ofd}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                elif stat.S_ISREG(st.st_mode):
                    fd = os.open(f"/proc/self/fd/{ofd}", flags | os.O_CLOEXEC | os.O_NOCTTY)
                elif stat.S_ISLNK(st.st_mode):
                    raise Fail(errno.ELOOP)
                else:
                    raise Fail(errno.ENXIO)  # the guest opens its own device nodes and FIFOs
            finally:
                os.close(ofd)
        fid.fd, fid.writable, fid.is_dir = fd, bool(writes), stat.S_ISDIR(st.st_mode)
        self.open_files += 1
        return Writer(p.TLOPEN + 1, tag).qid(self._qid(st)).u32(0).finish()

    def _lcreate(self, tag: int, r: Reader) -> bytes:
        fid = self._fid(r)
        name, flags, mode, gid = _check_name(r.string()), _host_open_flags(r.u32()), r.u32(), r.u32()
        self._writable_share()
        if fid.fd >= 0:
            raise Fail(errno.EBADF)
        if self.open_files >= MAX_OPEN:
            raise Fail(errno.EMFILE)
        # always O_EXCL: Linux sends Tlcreate for a name its lookup found free, and opening a
        # name that appeared meanwhile (a FIFO, say) must go through Tlopen's checks
        with self._dir(fid.names) as parent:
            fd = os.open(name, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY,
                         _safe_mode(mode, False), dir_fd=parent)
            _give_group(parent, name, gid)
        st = os.fstat(fd)
        fid.names, fid.fd, fid.writable = (*fid.names, name), fd, flags & os.O_ACCMODE != os.O_RDONLY
        self.open_files += 1
        return Writer(p.TLCREATE + 1, tag).qid(self._qid(st)).u32(0).finish()

    def _read(self, tag: int, r: Reader, writable: list[memoryview], room: int) -> int:
        try:
            fid = self._fid(r)
            offset, count = _offset(r.u64()), r.u32()
            if room < READ_HEADER:
                return 0  # no room even for the reply's header
            if fid.fd < 0 or fid.is_dir:
                raise Fail(errno.EISDIR if fid.is_dir else errno.EBADF)
            count = max(0, min(count, self.msize - READ_HEADER, room - READ_HEADER))
            header, data = split(writable, READ_HEADER)
            n = os.preadv(fid.fd, limit(data, count), offset) if count else 0
        except Fail as e:
            reply = p.error_reply(tag, e.errno)
        except OSError as e:
            reply = p.error_reply(tag, e.errno or errno.EIO)
        except ProtocolError:
            reply = p.error_reply(tag, errno.EINVAL)
        else:
            fill(header, p.HEADER.pack(READ_HEADER + n, p.TREAD + 1, tag) + p.U32.pack(n))
            return READ_HEADER + n
        if len(reply) > room:
            return 0
        fill(writable, reply)
        return len(reply)

    def _write(self, tag: int, r: Reader, readable: list[memoryview], size: int) -> bytes:
        fid = self._fid(r)
        offset, count = _offset(r.u64()), r.u32()
        if count > size - WRITE_HEADER:
            raise ProtocolError("Twrite count beyond the message")
        if fid.fd < 0 or not fid.writable:
            raise Fail(errno.EBADF)
        data = limit(split(readable, WRITE_HEADER)[1], count)
        n = os.pwritev(fid.fd, data, offset) if count else 0
        return Writer(p.TWRITE + 1, tag).u32(n).finish()

    def _readdir(self, tag: int, r: Reader) -> bytes:
        fid = self._fid(r)
        offset, count = r.u64(), r.u32()
        if fid.fd < 0 or not fid.is_dir:
            raise Fail(errno.EBADF)
        if offset == 0 or fid.entries is None:
            self._drop_listing(fid)
            entries = self._listing(fid)
            if self.listed + len(entries) > MAX_LISTED:  # a guest holding many big listings:
                for other in self.fids.values():  # the others are taken again when next read
                    self._drop_listing(other)
            fid.entries = entries
            self.listed += len(entries)
        count = min(count, self.msize - READ_HEADER)
        out = bytearray()
        for entry in fid.entries[offset:]:
            if len(out) + len(entry) > count:
                break
            out += entry
        w = Writer(p.TREADDIR + 1, tag).u32(len(out))
        w.buf += out
        return w.finish()

    def _listing(self, fid: Fid) -> list[bytes]:
        """The directory's entries, packed, each with the offset of the next one (the cookie a
        client resumes from). "." and ".." come first, as getdents gives them."""
        st = os.fstat(fid.fd)
        parent = self._lstat(fid.names[:-1]) if fid.names else st
        entries = [p.pack_dirent(self._qid(st), 1, 4, "."), p.pack_dirent(self._qid(parent), 2, 4, "..")]
        if len(fid.names) == 1 and fid.names[0] in self.opaque:
            return entries
        with os.scandir(fid.fd) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    qtype, dtype = p.QTDIR, 4  # DT_DIR
                elif e.is_symlink():
                    qtype, dtype = p.QTSYMLINK, 10  # DT_LNK
                else:
                    qtype, dtype = p.QTFILE, _dtype(e)
                qid = p.QID.pack(qtype, 0, self._qid_path(st.st_dev, e.inode()))
                entries.append(p.pack_dirent(qid, len(entries) + 1, dtype, e.name))
        return entries

    def _fsync(self, tag: int, r: Reader) -> bytes:
        fid = self._fid(r)
        datasync = r.u32()
        if fid.fd < 0:
            raise Fail(errno.EBADF)
        (os.fdatasync if datasync else os.fsync)(fid.fd)
        return Writer(p.TFSYNC + 1, tag).finish()

    # --- locks: open file description locks, so two guest opens conflict as two host opens do
    def _lock(self, tag: int, r: Reader) -> bytes:
        fid = self._fid(r)
        ltype, _flags, start, length = r.u8(), r.u32(), r.u64(), r.u64()
        if fid.fd < 0:
            raise Fail(errno.EBADF)
        # never wait here: Linux retries a blocking lock itself while the answer is BLOCKED
        try:
            fcntl.fcntl(fid.fd, fcntl.F_OFD_SETLK, _flock(ltype, start, length))
            status = p.LOCK_SUCCESS
        except OSError as e:
            status = p.LOCK_BLOCKED if e.errno in (errno.EAGAIN, errno.EACCES) else p.LOCK_ERROR
        return Writer(p.TLOCK + 1, tag).u8(status).finish()

    def _getlock(self, tag: int, r: Reader) -> bytes:
        fid = self._fid(r)
        ltype, start, length, proc_id, client = r.u8(), r.u64(), r.u64(), r.u32(), r.string()
        if fid.fd < 0:
            raise Fail(errno.EBADF)
        got = fcntl.fcntl(fid.fd, fcntl.F_OFD_GETLK, _flock(ltype, start, length))
        lock = ffi.new("struct flock *")
        ffi.memmove(lock, got, min(len(got), ffi.sizeof("struct flock")))
        kind = {fcntl.F_RDLCK: p.LOCK_TYPE_RDLCK, fcntl.F_WRLCK: p.LOCK_TYPE_WRLCK}.get(lock.l_type,
                                                                                      p.LOCK_TYPE_UNLCK)
        if kind != p.LOCK_TYPE_UNLCK:
            start, length, proc_id = lock.l_start, lock.l_len, max(lock.l_pid, 0)
        return Writer(p.TGETLOCK + 1, tag).u8(kind).u64(start).u64(length).u32(proc_id).string(client).finish()

    # --- changes to the tree ---------------------------------------------------------------
    def _mkdir(self, tag: int, r: Reader) -> bytes:
        fid = self._fid(r)
        name, mode, gid = _check_name(r.string()), r.u32(), r.u32()
        self._writable_share()
        with self._dir(fid.names) as parent:
            os.mkdir(name, _safe_mode(mode, True), dir_fd=parent)
            _give_group(parent, name, gid)
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        return Writer(p.TMKDIR + 1, tag).qid(self._qid(st)).finish()

    def _symlink(self, tag: int, r: Reader) -> bytes:
        fid = self._fid(r)
        name, target, gid = _check_name(r.string()), r.string(), r.u32()
        self._writable_share()
        if not target or len(target) > 4095 or "\0" in target:
            raise Fail(errno.EINVAL)
        with self._dir(fid.names) as parent:
            os.symlink(target, name, dir_fd=parent)  # the target is text: only the guest resolves it
            _give_group(parent, name, gid)
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        return Writer(p.TSYMLINK + 1, tag).qid(self._qid(st)).finish()

    def _mknod(self, tag: int, r: Reader) -> bytes:
        fid = self._fid(r)
        name, mode, _major, _minor, gid = _check_name(r.string()), r.u32(), r.u32(), r.u32(), r.u32()
        self._writable_share()
        if stat.S_IFMT(mode) not in (stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFREG):
            raise Fail(errno.EPERM)  # no host device nodes made by a guest
        with self._dir(fid.names) as parent:
            os.mknod(name, _safe_mode(mode, False) | stat.S_IFMT(mode), dir_fd=parent)
            _give_group(parent, name, gid)
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        return Writer(p.TMKNOD + 1, tag).qid(self._qid(st)).finish()

    def _link(self, tag: int, r: Reader) -> bytes:
        dfid, fid, name = self._fid(r), self._fid(r), _check_name(r.string())
        self._writable_share()
        if not fid.names:
            raise Fail(errno.EPERM)
        with self._dir(dfid.names) as parent, self._dir(fid.names[:-1]) as src:
            os.link(fid.names[-1], name, src_dir_fd=src, dst_dir_fd=parent, follow_symlinks=False)
        return Writer(p.TLINK + 1, tag).finish()

    def _move(self, old: tuple[str, ...], new: tuple[str, ...]) -> None:
        with self._dir(old[:-1]) as src, self._dir(new[:-1]) as dst:
            os.rename(old[-1], new[-1], src_dir_fd=src, dst_dir_fd=dst)
        n = len(old)
        for fid in self.fids.values():  # fids below the old name now live below the new one
            if fid.names[:n] == old:
                fid.names = new + fid.names[n:]

    def _rename(self, tag: int, r: Reader) -> bytes:
        fid, dfid, name = self._fid(r), self._fid(r), _check_name(r.string())
        self._writable_share()
        if not fid.names:
            raise Fail(errno.EBUSY)
        self._move(fid.names, (*dfid.names, name))
        return Writer(p.TRENAME + 1, tag).finish()

    def _renameat(self, tag: int, r: Reader) -> bytes:
        olddir, oldname = self._fid(r), _check_name(r.string())
        newdir, newname = self._fid(r), _check_name(r.string())
        self._writable_share()
        self._move((*olddir.names, oldname), (*newdir.names, newname))
        return Writer(p.TRENAMEAT + 1, tag).finish()

    def _unlinkat(self, tag: int, r: Reader) -> bytes:
        fid, name, flags = self._fid(r), _check_name(r.string()), r.u32()
        self._writable_share()
        with self._dir(fid.names) as parent:
            if flags & p.AT_REMOVEDIR:
                os.rmdir(name, dir_fd=parent)
            else:
                os.unlink(name, dir_fd=parent)
        return Writer(p.TUNLINKAT + 1, tag).finish()

    def _remove(self, tag: int, r: Reader) -> bytes:
        number = r.u32()
        fid = self.fids.pop(number, None)  # Tremove clunks the fid whatever the outcome
        if fid is None:
            raise Fail(errno.EBADF)
        self._close_file(fid)
        self._writable_share()
        if not fid.names:
            raise Fail(errno.EBUSY)
        with self._dir(fid.names[:-1]) as parent:
            if stat.S_ISDIR(os.stat(fid.names[-1], dir_fd=parent, follow_symlinks=False).st_mode):
                os.rmdir(fid.names[-1], dir_fd=parent)
            else:
                os.unlink(fid.names[-1], dir_fd=parent)
        return Writer(p.TREMOVE + 1, tag).finish()


def _safe_mode(mode: int, directory: bool) -> int:
    """Permission bits a guest may set on the host: no set-user-ID, and set-group-ID only on
    directories (where it means "inherit the group"), so that a guest running as root cannot
    leave set-ID programs in a host directory."""
    mode &= 0o7777 & ~stat.S_ISUID
    return mode if directory else mode & ~stat.S_ISGID


def _offset(value: int) -> int:
    if value > MAX_OFFSET:
        raise Fail(errno.EINVAL)
    return value


def _dtype(entry: os.DirEntry[str]) -> int:
    if entry.is_file(follow_symlinks=False):
        return 8  # DT_REG
    try:
        mode = entry.stat(follow_symlinks=False).st_mode
    except OSError:
        return 0  # DT_UNKNOWN: the client stats it if it cares
    return stat.S_IFMT(mode) >> 12  # DT_* is the S_IFMT nibble


def _give_group(parent: int, name: str, gid: int) -> None:
    """The group the guest asked for a new object to have, where the host lets pyvmm's user
    give it (chown(2)); otherwise it keeps pyvmm's."""
    try:
        os.chown(name, -1, gid, dir_fd=parent, follow_symlinks=False)
    except OSError:
        pass


def _flock(ltype: int, start: int, length: int) -> bytes:
    kind = {p.LOCK_TYPE_RDLCK: fcntl.F_RDLCK, p.LOCK_TYPE_WRLCK: fcntl.F_WRLCK}.get(ltype, fcntl.F_UNLCK)
    if start >= 1 << 63 or length >= 1 << 63:
        raise Fail(errno.EINVAL)
    lock = ffi.new("struct flock *", {"l_type": kind, "l_whence": os.SEEK_SET, "l_start": start, "l_len": length})
    return bytes(ffi.buffer(lock))

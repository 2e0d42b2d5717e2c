"""The shared directory as the 9P server reaches it: fids (paths of names below the share),
their host objects, reached by openat(2) one name at a time (see server.py), and the limits
on what a guest may hold."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from kvm_bindings import CData, ffi, libc
from kvm_bindings.constants import RESOLVE_BENEATH, RESOLVE_NO_MAGICLINKS, RESOLVE_NO_SYMLINKS, SYS_OPENAT2
from pyvmm.ninep import protocol as p
from pyvmm.ninep.protocol import Reader

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
RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS
OPEN_HOW_SIZE = ffi.sizeof("struct open_how")


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


class Share:
    """One host directory (`root`) and one 9P client's fids in it."""

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
        self._how = self._probe_openat2()
        self.msize = 8192
        self.fids: dict[int, Fid] = {}
        self.open_files = 0

    def end_session(self) -> None:
        """Forget every fid (Tversion, or the device's reset)."""
        for fid in self.fids.values():
            self._close_file(fid)
        self.fids.clear()

    def close(self) -> None:
        self.end_session()
        os.close(self.root_fd)

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
        fd = self._open(names, O_PATH_DIR)
        try:
            yield fd
        finally:
            os.close(fd)

    @contextmanager
    def _object(self, names: tuple[str, ...]) -> Iterator[int]:
        """An O_PATH descriptor of the object `names` itself (a symlink is not followed)."""
        fd = self._open(names, O_PATH_ANY)
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
        with self._object(names) as fd:
            return os.fstat(fd)

    def _open(self, names: tuple[str, ...], flags: int) -> int:
        """openat(2) of `names` below the share with `flags` (O_NOFOLLOW: a last name that is a
        symlink is opened as the link). One openat2(2) call where the kernel has it: with
        RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS it refuses, atomically, every symlink and every
        way out of the share, which is what the walk below does one component at a time."""
        if self._how is not None:
            self._how.flags = flags
            path = os.fsencode("/".join(names)) if names else b"."
            fd = libc.syscall(SYS_OPENAT2, self.root_fd, path, self._how, OPEN_HOW_SIZE)
            if fd >= 0:
                return int(fd)
            err = ffi.errno
            if err != errno.ENAMETOOLONG:  # beyond PATH_MAX: the walk below reaches it
                raise OSError(err, os.strerror(err))
        fd = os.open(".", O_PATH_DIR, dir_fd=self.root_fd)
        try:
            for i, name in enumerate(names):
                nxt = os.open(name, O_PATH_DIR if i < len(names) - 1 else flags, dir_fd=fd)
                os.close(fd)
                fd = nxt
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _probe_openat2(self) -> CData | None:
        """openat2's request block if this kernel has the call (Linux 5.6; a container's seccomp
        policy may still refuse it), else None: the server then walks one name at a time."""
        how = ffi.new("struct open_how *", {"flags": O_PATH_DIR, "resolve": RESOLVE})
        fd = libc.syscall(SYS_OPENAT2, self.root_fd, b".", how, OPEN_HOW_SIZE)
        if fd < 0:
            return None
        os.close(fd)
        return how

    def _qid(self, st: os.stat_result) -> bytes:
        if stat.S_ISDIR(st.st_mode):
            kind = p.QTDIR
        elif stat.S_ISLNK(st.st_mode):
            kind = p.QTSYMLINK
        else:
            kind = p.QTFILE
        return p.QID.pack(kind, qid_version(st), self._qid_path(st.st_dev, st.st_ino))

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


def qid_version(st: os.stat_result) -> int:
    """A qid's version: it changes when the file does, from its modification time and size, as
    QEMU's 9p server makes it. Never 0: Linux >= 6.4 reads and writes a file whose version is 0
    around its page cache (fs/9p/fid.h, v9fs_fid_add_modes), one small request after another,
    and a cache=loose client keeps an inode only while the version it saw stays the same."""
    mtime = st.st_mtime_ns
    return ((mtime ^ (mtime >> 32) ^ (st.st_size << 8)) & 0xFFFF_FFFF) or 1


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

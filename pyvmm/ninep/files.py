"""9P2000.L requests on files: attributes, open and create, read and write (straight between
the host file and guest RAM), directory listings, fsync and locks."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time

from kvm_bindings import ffi
from pyvmm.devices.virtio.rings.buffers import fill, limit, split
from pyvmm.ninep import protocol as p
from pyvmm.ninep.protocol import ProtocolError, Reader, Writer
from pyvmm.ninep.share import (
    MAX_LISTED,
    MAX_OPEN,
    READ_HEADER,
    WRITE_HEADER,
    Fail,
    Fid,
    Share,
    _check_name,
    _dtype,
    _flock,
    _give_group,
    _host_open_flags,
    _offset,
    _safe_mode,
)


class FileOps(Share):
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


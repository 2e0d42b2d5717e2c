"""9P2000.L requests on names: walking, clunking, and making, linking, renaming and removing
entries of the share."""

from __future__ import annotations

import errno
import os
import stat

from pyvmm.ninep import protocol as p
from pyvmm.ninep.protocol import Reader, Writer
from pyvmm.ninep.share import (
    Fail,
    Fid,
    Share,
    _check_name,
    _give_group,
    _safe_mode,
)


class NameOps(Share):
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



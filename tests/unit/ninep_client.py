"""A small 9P2000.L client for testing pyvmm's file server without a guest: it builds
T-messages, hands them to FileServer.handle in buffers as a virtqueue chain would hold them,
and decodes the R-messages."""

from __future__ import annotations

import errno
import os
import struct

from pyvmm.ninep import protocol as p
from pyvmm.ninep.server import FileServer


class NinepError(OSError):
    pass


class Client:
    def __init__(self, server: FileServer, msize: int = 64 << 10, split_at: int | None = None) -> None:
        self.server, self.msize, self.split_at = server, msize, split_at
        self.tag = 0
        self.next_fid = 1

    # --- transport -----------------------------------------------------------------------------
    def raw(self, message: bytes, room: int | None = None) -> bytes:
        """Send one message (size filled in), return the reply bytes."""
        out = bytearray(self.msize if room is None else room)
        views = [memoryview(out)]
        if self.split_at is not None and len(out) > self.split_at:  # the reply spans two buffers
            views = [memoryview(out)[:self.split_at], memoryview(out)[self.split_at:]]
        n = self.server.handle([memoryview(bytearray(message))], views)
        return bytes(out[:n])

    def call(self, mtype: int, body: bytes, room: int | None = None) -> bytes:
        self.tag = (self.tag + 1) & 0x7FFF
        msg = p.HEADER.pack(p.HEADER.size + len(body), mtype, self.tag) + body
        reply = self.raw(msg, room)
        size, rtype, tag = p.HEADER.unpack_from(reply)
        assert size == len(reply) and tag == self.tag
        if rtype == p.RLERROR:
            code = struct.unpack_from("<I", reply, 7)[0]
            raise NinepError(code, os.strerror(code))
        assert rtype == mtype + 1, (rtype, mtype)
        return reply[7:]

    # --- messages --------------------------------------------------------------------------------
    def version(self, msize: int | None = None, version: str = p.VERSION) -> tuple[int, str]:
        r = self.call(p.TVERSION, struct.pack("<I", msize or self.msize) + s(version))
        return struct.unpack_from("<I", r)[0], r[6:].decode()

    def attach(self) -> int:
        self.version()
        fid = self.fid()
        self.call(p.TATTACH, struct.pack("<II", fid, p.NOFID) + s("root") + s("") + struct.pack("<I", 0))
        return fid

    def fid(self) -> int:
        self.next_fid += 1
        return self.next_fid

    def walk(self, fid: int, *names: str, newfid: int | None = None) -> tuple[int, list[bytes]]:
        new = self.fid() if newfid is None else newfid
        body = struct.pack("<IIH", fid, new, len(names)) + b"".join(s(n) for n in names)
        r = self.call(p.TWALK, body)
        count = struct.unpack_from("<H", r)[0]
        return new, [r[2 + 13 * i:15 + 13 * i] for i in range(count)]

    def walk_all(self, fid: int, path: str) -> int:
        names = [n for n in path.split("/") if n]
        new, qids = self.walk(fid, *names)
        if len(qids) != len(names):
            raise NinepError(errno.ENOENT, f"partial walk to {path}")
        return new

    def getattr(self, fid: int) -> dict[str, int]:
        r = self.call(p.TGETATTR, struct.pack("<IQ", fid, p.STATS_BASIC))
        valid = struct.unpack_from("<Q", r)[0]
        mode, uid, gid, nlink, rdev, size, blksize, blocks = struct.unpack_from("<IIIQQQQQ", r, 21)
        ino = struct.unpack_from("<Q", r, 13)[0]
        return {"valid": valid, "mode": mode, "uid": uid, "gid": gid, "nlink": nlink, "size": size,
                "qtype": r[8], "path": ino, "mtime": struct.unpack_from("<Q", r, 21 + 52 + 16)[0]}

    def lopen(self, fid: int, flags: int = 0) -> bytes:
        return self.call(p.TLOPEN, struct.pack("<II", fid, flags))

    def lcreate(self, fid: int, name: str, flags: int = 2, mode: int = 0o644) -> bytes:
        return self.call(p.TLCREATE, struct.pack("<I", fid) + s(name) + struct.pack("<III", flags, mode, 0))

    def read(self, fid: int, offset: int, count: int, room: int | None = None) -> bytes:
        r = self.call(p.TREAD, struct.pack("<IQI", fid, offset, count), room)
        n = struct.unpack_from("<I", r)[0]
        assert len(r) == 4 + n
        return r[4:]

    def read_all(self, fid: int, chunk: int = 8192) -> bytes:
        out, off = bytearray(), 0
        while data := self.read(fid, off, chunk):
            out += data
            off += len(data)
        return bytes(out)

    def write(self, fid: int, offset: int, data: bytes) -> int:
        r = self.call(p.TWRITE, struct.pack("<IQI", fid, offset, len(data)) + data)
        return int(struct.unpack_from("<I", r)[0])

    def readdir(self, fid: int, offset: int = 0, count: int = 8192) -> list[tuple[str, int, int]]:
        r = self.call(p.TREADDIR, struct.pack("<IQI", fid, offset, count))
        n = struct.unpack_from("<I", r)[0]
        data, pos, out = r[4:4 + n], 0, []
        while pos < len(data):
            off, dtype, nlen = struct.unpack_from("<QBH", data, pos + 13)
            name = data[pos + 24:pos + 24 + nlen].decode()
            out.append((name, off, dtype))
            pos += 24 + nlen
        return out

    def listdir(self, fid: int) -> list[str]:
        names, offset = [], 0
        while entries := self.readdir(fid, offset, 200):
            names += [e[0] for e in entries]
            offset = entries[-1][1]
        return names

    def clunk(self, fid: int) -> None:
        self.call(p.TCLUNK, struct.pack("<I", fid))

    def mkdir(self, fid: int, name: str, mode: int = 0o755) -> bytes:
        return self.call(p.TMKDIR, struct.pack("<I", fid) + s(name) + struct.pack("<II", mode, 0))

    def symlink(self, fid: int, name: str, target: str) -> bytes:
        return self.call(p.TSYMLINK, struct.pack("<I", fid) + s(name) + s(target) + struct.pack("<I", 0))

    def readlink(self, fid: int) -> str:
        r = self.call(p.TREADLINK, struct.pack("<I", fid))
        return r[2:].decode()

    def link(self, dfid: int, fid: int, name: str) -> None:
        self.call(p.TLINK, struct.pack("<II", dfid, fid) + s(name))

    def renameat(self, olddir: int, old: str, newdir: int, new: str) -> None:
        self.call(p.TRENAMEAT, struct.pack("<I", olddir) + s(old) + struct.pack("<I", newdir) + s(new))

    def unlinkat(self, fid: int, name: str, flags: int = 0) -> None:
        self.call(p.TUNLINKAT, struct.pack("<I", fid) + s(name) + struct.pack("<I", flags))

    def mknod(self, fid: int, name: str, mode: int) -> None:
        self.call(p.TMKNOD, struct.pack("<I", fid) + s(name) + struct.pack("<IIII", mode, 1, 3, 0))

    def setattr(self, fid: int, valid: int, mode: int = 0, size: int = 0, mtime: int = 0) -> None:
        self.call(p.TSETATTR, struct.pack("<IIIIIQQQQQ", fid, valid, mode, 0, 0, size, 0, 0, mtime, 0))

    def fsync(self, fid: int) -> None:
        self.call(p.TFSYNC, struct.pack("<II", fid, 0))

    def statfs(self, fid: int) -> tuple[int, ...]:
        return struct.unpack_from("<IIQQQQQQI", self.call(p.TSTATFS, struct.pack("<I", fid)))

    def lock(self, fid: int, ltype: int, start: int = 0, length: int = 0) -> int:
        r = self.call(p.TLOCK, struct.pack("<IBIQQI", fid, ltype, 0, start, length, 1) + s("guest"))
        return r[0]

    def getlock(self, fid: int, ltype: int) -> int:
        r = self.call(p.TGETLOCK, struct.pack("<IBQQI", fid, ltype, 0, 0, 1) + s("guest"))
        return r[0]


def s(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<H", len(raw)) + raw

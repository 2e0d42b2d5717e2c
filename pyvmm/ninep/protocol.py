"""9P2000.L on the wire: message types, and reading and writing their fields.

Every message is size[4] type[1] tag[2] followed by its fields, all little-endian; a string is
len[2] followed by that many bytes of UTF-8 (no NUL); a qid is type[1] version[4] path[8]. The
message numbers and field lists follow Linux's include/net/9p/9p.h and net/9p/client.c, which
is the client this server is written for; diod's protocol.md describes the same dialect.
"""

from __future__ import annotations

import struct

VERSION = "9P2000.L"
NOTAG = 0xFFFF
NOFID = 0xFFFF_FFFF
HEADER = struct.Struct("<IBH")  # size, type, tag
QID = struct.Struct("<BIQ")

# T-message numbers; each reply is the number + 1, Rlerror replaces any reply on failure.
TSTATFS, TLOPEN, TLCREATE, TSYMLINK, TMKNOD, TRENAME, TREADLINK = 8, 12, 14, 16, 18, 20, 22
TGETATTR, TSETATTR, TXATTRWALK, TXATTRCREATE, TREADDIR = 24, 26, 30, 32, 40
TFSYNC, TLOCK, TGETLOCK, TLINK, TMKDIR, TRENAMEAT, TUNLINKAT = 50, 52, 54, 70, 72, 74, 76
TVERSION, TAUTH, TATTACH, TFLUSH, TWALK, TREAD, TWRITE, TCLUNK, TREMOVE = 100, 102, 104, 108, 110, 116, 118, 120, 122
RLERROR = 7

# qid.type
QTDIR, QTSYMLINK, QTFILE = 0x80, 0x02, 0x00

# Tgetattr's request mask / Rgetattr's valid mask: P9_STATS_BASIC is everything but btime, gen
# and data_version, which Linux does not ask for.
STATS_BASIC = 0x7FF

# Tsetattr's valid bits (P9_ATTR_*)
ATTR_MODE, ATTR_UID, ATTR_GID, ATTR_SIZE = 0x1, 0x2, 0x4, 0x8
ATTR_ATIME, ATTR_MTIME, ATTR_CTIME, ATTR_ATIME_SET, ATTR_MTIME_SET = 0x10, 0x20, 0x40, 0x80, 0x100

# Tlopen/Tlcreate flags (P9_DOTL_*): Linux's generic open flag values, fixed by the protocol, not
# the server's own (arm64's O_DIRECTORY and O_NOFOLLOW differ from them, for one).
DOTL_ACCMODE, DOTL_CREATE, DOTL_EXCL, DOTL_TRUNC, DOTL_APPEND = 0o3, 0o100, 0o200, 0o1000, 0o2000
DOTL_DSYNC, DOTL_SYNC = 0o10000, 0o4000000

# Tlock
LOCK_TYPE_RDLCK, LOCK_TYPE_WRLCK, LOCK_TYPE_UNLCK = 0, 1, 2
LOCK_SUCCESS, LOCK_BLOCKED, LOCK_ERROR = 0, 1, 2

AT_REMOVEDIR = 0x200  # Tunlinkat's flags


class ProtocolError(Exception):
    """A malformed message: answered with Rlerror EINVAL (or, without a tag, not at all)."""


class Reader:
    """The fields of one T-message, read in order; running past the end is a ProtocolError."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes, pos: int = HEADER.size) -> None:
        self.data, self.pos = data, pos

    def _take(self, fmt: struct.Struct) -> tuple[int, ...]:
        end = self.pos + fmt.size
        if end > len(self.data):
            raise ProtocolError("message too short")
        values = fmt.unpack_from(self.data, self.pos)
        self.pos = end
        return values

    def u8(self) -> int:
        return self._take(U8)[0]

    def u16(self) -> int:
        return self._take(U16)[0]

    def u32(self) -> int:
        return self._take(U32)[0]

    def u64(self) -> int:
        return self._take(U64)[0]

    def string(self) -> str:
        n = self.u16()
        end = self.pos + n
        if end > len(self.data):
            raise ProtocolError("string runs past the message")
        raw = self.data[self.pos:end]
        self.pos = end
        try:
            return raw.decode("utf-8", "surrogateescape")  # host names need not be UTF-8
        except UnicodeDecodeError:  # pragma: no cover - surrogateescape decodes any bytes
            raise ProtocolError("bad string") from None


U8, U16, U32, U64 = struct.Struct("<B"), struct.Struct("<H"), struct.Struct("<I"), struct.Struct("<Q")


class Writer:
    """An R-message being built; bytes() gives it with its size filled in."""

    __slots__ = ("buf",)

    def __init__(self, rtype: int, tag: int) -> None:
        self.buf = bytearray(HEADER.pack(0, rtype, tag))

    def u8(self, v: int) -> Writer:
        self.buf += U8.pack(v)
        return self

    def u16(self, v: int) -> Writer:
        self.buf += U16.pack(v)
        return self

    def u32(self, v: int) -> Writer:
        self.buf += U32.pack(v & 0xFFFF_FFFF)
        return self

    def u64(self, v: int) -> Writer:
        self.buf += U64.pack(v & 0xFFFF_FFFF_FFFF_FFFF)
        return self

    def string(self, s: str) -> Writer:
        raw = s.encode("utf-8", "surrogateescape")
        self.buf += U16.pack(len(raw)) + raw
        return self

    def qid(self, q: bytes) -> Writer:
        self.buf += q
        return self

    def finish(self) -> bytes:
        U32.pack_into(self.buf, 0, len(self.buf))
        return bytes(self.buf)


def error_reply(tag: int, errno_value: int) -> bytes:
    return Writer(RLERROR, tag).u32(errno_value).finish()


def pack_dirent(qid: bytes, offset: int, dtype: int, name: str) -> bytes:
    """One Rreaddir entry: qid[13] offset[8] type[1] name[s]."""
    raw = name.encode("utf-8", "surrogateescape")
    return qid + U64.pack(offset) + U8.pack(dtype) + U16.pack(len(raw)) + raw

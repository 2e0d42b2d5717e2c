"""The 9P2000.L file server (pyvmm/ninep/server.py), driven by a test client: its semantics,
its confinement to the shared directory, and its answers to malformed messages."""

from __future__ import annotations

import errno
import os
import random
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvm_bindings import libc as kvm_libc
from pyvmm.devices.virtio.p9 import Virtio9p, parse_share
from pyvmm.errors import VmmError
from pyvmm.ninep import protocol as p
from pyvmm.ninep import share as share_module
from pyvmm.ninep.server import FileServer
from pyvmm.ninep.share import MAX_OPEN, Share
from tests import fuzzing
from tests.unit.ninep_client import Client, NinepError

RDONLY, WRONLY, RDWR, TRUNC, APPEND = 0, 1, 2, 0o1000, 0o2000


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """share/ with a file, a subdirectory, symlinks pointing out of it; secret.txt beside it."""
    share = tmp_path / "share"
    (share / "sub").mkdir(parents=True)
    (share / "hello.txt").write_bytes(b"hello, 9p\n")
    (share / "sub" / "deep.bin").write_bytes(bytes(range(256)) * 1024)
    (share / "abs").symlink_to("/etc")
    (share / "rel").symlink_to("../..")
    (share / "out").symlink_to(tmp_path / "secret.txt")
    (tmp_path / "secret.txt").write_text("outside\n")
    os.mkfifo(share / "fifo")
    return share


@pytest.fixture(autouse=True, params=["openat2", "one name at a time"])
def lookup(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs with both ways of reaching a name: the kernel's openat2(2), and the walk
    the server falls back to where openat2 is missing or refused."""
    if request.param != "openat2":
        monkeypatch.setattr(Share, "_probe_openat2", lambda self: None)
    return str(request.param)


def connect(root: Path, read_only: bool = False, **kw: int) -> Iterator[tuple[Client, int]]:
    server = FileServer(str(root), read_only=read_only)
    c = Client(server, **kw)
    try:
        yield c, c.attach()
    finally:
        server.close()


@pytest.fixture
def rw(tree: Path) -> Iterator[tuple[Client, int]]:
    yield from connect(tree)


@pytest.fixture
def ro(tree: Path) -> Iterator[tuple[Client, int]]:
    yield from connect(tree, read_only=True)


def err(e: pytest.ExceptionInfo[NinepError]) -> int:
    return e.value.errno or 0


def test_version_negotiates_msize_and_refuses_other_dialects(tree: Path) -> None:
    server = FileServer(str(tree), read_only=True)
    c = Client(server)
    assert c.version(512 << 10) == (512 << 10, p.VERSION)
    assert c.version(1 << 30)[0] == 1 << 20  # capped
    assert c.version(16 << 10, "9P2000.u")[1] == "unknown"
    server.close()


def test_walk_getattr_open_read(ro: tuple[Client, int], tree: Path) -> None:
    c, root = ro
    fid, qids = c.walk(root, "sub", "deep.bin")
    assert [q[0] for q in qids] == [p.QTDIR, p.QTFILE]
    attr = c.getattr(fid)
    st = os.stat(tree / "sub" / "deep.bin")
    assert (attr["size"], attr["mode"], attr["path"]) == (st.st_size, st.st_mode, st.st_ino)
    c.lopen(fid, RDONLY)
    assert c.read_all(fid, 60_000) == (tree / "sub" / "deep.bin").read_bytes()
    c.clunk(fid)
    with pytest.raises(NinepError) as e:
        c.getattr(fid)
    assert err(e) == errno.EBADF


def qid_of(c: Client, root: int, *names: str) -> bytes:
    fid, qids = c.walk(root, *names)
    c.clunk(fid)
    return qids[-1]


def test_a_qid_version_changes_with_its_file_and_is_never_zero(ro: tuple[Client, int], tree: Path) -> None:
    """Linux caches a 9p file only while its qid's version is not 0 and stays what it was: a
    version that does not change when the file does leaves the guest its old pages."""
    c, root = ro
    first = qid_of(c, root, "hello.txt")
    assert first == qid_of(c, root, "hello.txt")  # nothing changed: the same qid
    version = struct.unpack_from("<I", first, 1)[0]
    assert version != 0
    path = tree / "hello.txt"
    path.write_bytes(b"HELLO, 9p\n")  # same size, a new modification time
    os.utime(path, ns=(0, os.stat(path).st_mtime_ns + 1_000))
    second = qid_of(c, root, "hello.txt")
    assert second[0] == first[0] and second[5:] == first[5:]  # the same file
    assert second[1:5] != first[1:5]
    path.write_bytes(b"HELLO, 9p, longer\n")  # a new size, even where the clock is coarse
    os.utime(path, ns=(0, os.stat(tree / "hello.txt").st_mtime_ns - 1_000))
    assert qid_of(c, root, "hello.txt")[1:5] not in (first[1:5], second[1:5])


@pytest.mark.parametrize("lookup", ["openat2"])  # not the fallback: it walks one name at a time
def test_a_name_is_reached_in_one_openat2_call(ro: tuple[Client, int], lookup: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the kernel has openat2, a lookup at any depth is one system call, not one per
    name (the server's cost per request would grow with the depth)."""
    c, root = ro
    assert c.server._how is not None  # Linux >= 5.6, and nothing refuses it here
    calls: list[bytes] = []
    real = kvm_libc

    class Counting:
        def syscall(self, number: int, dirfd: int, path: bytes, how: object, size: int) -> int:
            calls.append(path)
            return int(real.syscall(number, dirfd, path, how, size))

    monkeypatch.setattr(share_module, "libc", Counting())
    fid, qids = c.walk(root, "sub", "deep.bin")
    assert len(qids) == 2
    c.getattr(fid)
    assert calls and all(path in (b"sub", b"sub/deep.bin") for path in calls), calls
    assert len(calls) <= 3, calls


def test_a_read_reply_may_span_buffers_and_never_exceeds_them(tree: Path) -> None:
    for c, root in connect(tree, read_only=True, split_at=5):  # the 11-byte header split 5 + 6
        fid = c.walk_all(root, "sub/deep.bin")
        c.lopen(fid)
        assert c.read(fid, 3, 1000) == (bytes(range(256)) * 4)[3:1003]
        assert len(c.read(fid, 0, 1 << 20, room=100)) == 100 - 11  # bounded by the room given
        assert c.read(fid, 1 << 40, 100) == b""


def test_readdir_lists_everything_once_and_resumes_from_cookies(ro: tuple[Client, int], tree: Path) -> None:
    c, root = ro
    d, _ = c.walk(root)
    c.lopen(d)
    names = c.listdir(d)
    assert sorted(names) == sorted([".", "..", *os.listdir(tree)])
    first = c.readdir(d, 0)
    assert [e[0] for e in c.readdir(d, first[2][1])] == [e[0] for e in first[3:]]
    types = {name: dtype for name, _, dtype in first}
    assert (types["sub"], types["abs"], types["hello.txt"], types["fifo"]) == (4, 10, 8, 1)


def test_a_read_only_share_refuses_every_change(ro: tuple[Client, int], tree: Path) -> None:
    c, root = ro
    attempts: list[Callable[[], object]] = [
        lambda: c.lcreate(c.walk(root)[0], "new"),
        lambda: c.mkdir(root, "newdir"),
        lambda: c.symlink(root, "ln", "x"),
        lambda: c.unlinkat(root, "hello.txt"),
        lambda: c.renameat(root, "hello.txt", root, "moved"),
        lambda: c.lopen(c.walk_all(root, "hello.txt"), WRONLY),
        lambda: c.lopen(c.walk_all(root, "hello.txt"), RDONLY | TRUNC),
        lambda: c.setattr(c.walk_all(root, "hello.txt"), p.ATTR_SIZE, size=0),
        lambda: c.mknod(root, "p", stat.S_IFIFO | 0o644),
        lambda: c.link(root, c.walk_all(root, "hello.txt"), "hard"),
    ]
    for attempt in attempts:
        with pytest.raises(NinepError) as e:
            attempt()
        assert err(e) == errno.EROFS
    assert sorted(os.listdir(tree)) == sorted(["sub", "hello.txt", "abs", "rel", "out", "fifo"])
    assert (tree / "hello.txt").read_bytes() == b"hello, 9p\n"


def test_create_write_rename_link_unlink_on_a_writable_share(rw: tuple[Client, int], tree: Path) -> None:
    c, root = rw
    f, _ = c.walk(root, "sub")
    c.lcreate(f, "made.txt", RDWR, 0o640)
    assert c.write(f, 0, b"0123456789") == 10
    assert c.write(f, 4, b"AB") == 2
    c.fsync(f)
    assert (tree / "sub" / "made.txt").read_bytes() == b"0123AB6789"
    assert stat.S_IMODE(os.stat(tree / "sub" / "made.txt").st_mode) == 0o640 & ~_umask()
    assert c.read(f, 0, 100) == b"0123AB6789"
    c.setattr(f, p.ATTR_SIZE, size=4)
    assert c.getattr(f)["size"] == 4
    sub = c.walk_all(root, "sub")
    c.mkdir(sub, "inner", 0o700)
    assert (tree / "sub" / "inner").is_dir()
    c.renameat(sub, "made.txt", sub, "renamed.txt")
    assert c.getattr(f)["size"] == 4  # an open fid follows its file
    moved = c.walk_all(root, "sub/renamed.txt")
    c.link(sub, moved, "hard")
    assert os.stat(tree / "sub" / "hard").st_ino == os.stat(tree / "sub" / "renamed.txt").st_ino
    c.symlink(sub, "ln", "../hello.txt")
    assert c.readlink(c.walk_all(root, "sub/ln")) == "../hello.txt"
    assert os.readlink(tree / "sub" / "ln") == "../hello.txt"
    c.setattr(moved, p.ATTR_MODE, mode=0o600)
    assert stat.S_IMODE(os.stat(tree / "sub" / "renamed.txt").st_mode) == 0o600
    c.setattr(moved, p.ATTR_MTIME | p.ATTR_MTIME_SET, mtime=1_000_000)
    assert os.stat(tree / "sub" / "renamed.txt").st_mtime == 1_000_000
    c.unlinkat(sub, "hard")
    c.unlinkat(sub, "inner", p.AT_REMOVEDIR)
    assert sorted(os.listdir(tree / "sub")) == ["deep.bin", "ln", "renamed.txt"]
    c.mknod(sub, "pipe", stat.S_IFIFO | 0o600)
    assert stat.S_ISFIFO(os.lstat(tree / "sub" / "pipe").st_mode)
    with pytest.raises(NinepError) as e:
        c.mknod(sub, "disk", stat.S_IFBLK | 0o600)  # no host device nodes made by a guest
    assert err(e) == errno.EPERM
    assert c.statfs(root)[0] == 0x01021997


def test_renaming_a_directory_carries_the_fids_below_it(rw: tuple[Client, int], tree: Path) -> None:
    c, root = rw
    deep = c.walk_all(root, "sub/deep.bin")
    c.renameat(root, "sub", root, "moved")
    c.lopen(deep)
    assert c.read(deep, 0, 4) == bytes(range(4))


def test_an_unlinked_open_file_is_still_readable(rw: tuple[Client, int], tree: Path) -> None:
    c, root = rw
    f = c.walk_all(root, "hello.txt")
    c.lopen(f, RDWR)
    c.unlinkat(root, "hello.txt")
    assert c.getattr(f)["size"] == 10
    assert c.read(f, 0, 100) == b"hello, 9p\n"


def test_locks_conflict_between_two_opens(rw: tuple[Client, int]) -> None:
    c, root = rw
    a, b = c.walk_all(root, "hello.txt"), c.walk_all(root, "hello.txt")
    c.lopen(a, RDWR)
    c.lopen(b, RDWR)
    assert c.lock(a, p.LOCK_TYPE_WRLCK) == p.LOCK_SUCCESS
    assert c.lock(b, p.LOCK_TYPE_WRLCK) == p.LOCK_BLOCKED  # never waits in the server
    assert c.getlock(b, p.LOCK_TYPE_WRLCK) == p.LOCK_TYPE_WRLCK
    assert c.lock(a, p.LOCK_TYPE_UNLCK) == p.LOCK_SUCCESS
    assert c.lock(b, p.LOCK_TYPE_WRLCK) == p.LOCK_SUCCESS


# --- confinement -------------------------------------------------------------------------------
def test_dotdot_at_the_root_stays_at_the_root(ro: tuple[Client, int], tree: Path) -> None:
    c, root = ro
    fid, qids = c.walk(root, "..", "..", "..")
    assert c.getattr(fid)["path"] == os.stat(tree).st_ino
    back = c.walk_all(root, "sub")
    up, _ = c.walk(back, "..", "..")
    assert c.getattr(up)["path"] == os.stat(tree).st_ino
    c.lopen(up)
    assert "secret.txt" not in c.listdir(up)
    with pytest.raises(NinepError):
        c.walk_all(root, "../secret.txt")


def test_symlinks_are_never_followed_by_the_server(ro: tuple[Client, int]) -> None:
    c, root = ro
    for link in ("abs", "rel", "out"):
        fid, qids = c.walk(root, link)
        assert qids[0][0] == p.QTSYMLINK
        with pytest.raises(NinepError) as e:
            c.lopen(fid)
        assert err(e) == errno.ELOOP
        # a symlink is no directory to walk through: the walk stops there (a partial walk,
        # walk(5): the qids so far, and no new fid)
        new, qids = c.walk(root, link, "hostname")
        assert len(qids) == 1 and new not in c.server.fids
        with pytest.raises(NinepError) as e:
            c.walk(fid, "hostname")
        assert err(e) in (errno.ENOTDIR, errno.ELOOP)
    assert c.readlink(c.walk_all(root, "abs")) == "/etc"  # the guest resolves it, in its own tree


def test_names_with_slashes_or_nul_are_refused(ro: tuple[Client, int]) -> None:
    c, root = ro
    for bad in ("sub/deep.bin", "../share", "/etc", "a\0b", "x" * 256):
        with pytest.raises(NinepError) as e:
            c.walk(root, bad)
        assert err(e) in (errno.EINVAL, errno.ENAMETOOLONG)


def test_host_fifos_and_devices_are_not_opened(ro: tuple[Client, int]) -> None:
    c, root = ro
    with pytest.raises(NinepError) as e:
        c.lopen(c.walk_all(root, "fifo"))  # would block the server for ever if it were opened
    assert err(e) == errno.ENXIO


def test_swapping_a_directory_for_a_symlink_never_leads_out(rw: tuple[Client, int], tree: Path) -> None:
    """A racing rename puts a symlink to the outside where a directory was, while the client
    walks into it and opens the file below: every read gives the share's file or fails."""
    c, root = rw
    (tree / "sub" / "secret.txt").write_text("inside\n")
    (tree / "evil").symlink_to(tree.parent)
    stop = threading.Event()
    swaps = 0

    def swap() -> None:
        nonlocal swaps
        while not stop.is_set():
            os.rename(tree / "sub", tree / "sub.real")
            os.rename(tree / "evil", tree / "sub")
            if swaps % 4 == 0:
                time.sleep(0.0005)  # now and then a window long enough for a whole walk and read
            os.rename(tree / "sub", tree / "evil")
            os.rename(tree / "sub.real", tree / "sub")
            swaps += 1
            if swaps % 4 == 1:
                time.sleep(0.0005)  # and one with the real directory in place

    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # interleave the two threads finely
    t = threading.Thread(target=swap)
    t.start()
    seen: set[bytes] = set()
    walks = refused = 0
    deadline = time.monotonic() + 30
    try:
        # until both outcomes have come often (a busy machine may take longer), within 30 s
        while (walks < 50 or refused < 50) and time.monotonic() < deadline:
            try:
                fid = c.walk_all(root, "sub/secret.txt")
                c.lopen(fid)
                seen.add(c.read(fid, 0, 100))
                c.clunk(fid)
                walks += 1
            except NinepError:
                refused += 1
    finally:
        stop.set()
        t.join()
        sys.setswitchinterval(previous)
    assert seen <= {b"inside\n"}
    assert walks and refused and swaps, (walks, refused, swaps)  # the race was run, both ways


# --- hostile clients -------------------------------------------------------------------------
def test_malformed_messages_get_einval_or_no_reply(ro: tuple[Client, int]) -> None:
    c, root = ro
    assert c.raw(b"\x03\x00") == b""  # no tag to answer to
    for msg in (p.HEADER.pack(7, p.TWALK, 1),  # fields missing
                p.HEADER.pack(99, p.TGETATTR, 1) + b"\0" * 8,  # size beyond the buffers
                p.HEADER.pack(7 + 4 + 2, p.TREADLINK, 1) + struct.pack("<I", root) + b"\xff\xff"):
        reply = c.raw(msg)
        assert struct.unpack_from("<IBHI", reply)[1:] == (p.RLERROR, 1, errno.EINVAL)
    reply = c.raw(p.HEADER.pack(7, 250, 9))
    assert struct.unpack_from("<IBHI", reply)[1:] == (p.RLERROR, 9, errno.EOPNOTSUPP)
    with pytest.raises(NinepError) as e:  # a count beyond the message it came in
        c.call(p.TWRITE, struct.pack("<IQI", root, 0, 1 << 20) + b"abc")
    assert err(e) == errno.EINVAL
    assert c.raw(p.HEADER.pack(7, p.TFLUSH, 1) + b"\0\0", room=3) == b""  # no room for any reply


def test_fids_and_open_files_are_bounded(ro: tuple[Client, int]) -> None:
    c, root = ro
    opened = []
    with pytest.raises(NinepError) as e:
        for _ in range(MAX_OPEN + 1):
            fid = c.walk_all(root, "hello.txt")
            c.lopen(fid)
            opened.append(fid)
    assert err(e) == errno.EMFILE and len(opened) == MAX_OPEN
    with pytest.raises(NinepError) as e:
        c.walk(root, newfid=root + 1 if root + 1 in c.server.fids else opened[0])  # newfid in use
    assert err(e) == errno.EBADF


def test_the_device_advertises_its_tag(tree: Path) -> None:
    dev = Virtio9p(str(tree), "hostshare", read_only=True)
    assert bytes(dev.config) == struct.pack("<H", 9) + b"hostshare"
    assert (dev.device_id, dev.features) == (9, 1)
    dev.close()
    assert parse_share(f"{tree},t,ro") == (str(tree), "t", True)
    for bad in ("", str(tree), f"{tree},", f"{tree},t,rw"):
        with pytest.raises(VmmError):
            parse_share(bad)
    with pytest.raises(VmmError, match="not a directory"):
        Virtio9p(str(tree / "hello.txt"), "t")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


MESSAGE_TYPES = [p.TVERSION, p.TATTACH, p.TWALK, p.TCLUNK, p.TGETATTR, p.TSETATTR, p.TLOPEN, p.TLCREATE,
                 p.TREAD, p.TWRITE, p.TREADDIR, p.TSTATFS, p.TREADLINK, p.TMKDIR, p.TSYMLINK, p.TMKNOD,
                 p.TLINK, p.TRENAME, p.TRENAMEAT, p.TUNLINKAT, p.TREMOVE, p.TFSYNC, p.TLOCK, p.TGETLOCK,
                 p.TFLUSH, p.TAUTH, p.TXATTRWALK]
NAMES = ["a", "b", "..", ".", "sub", "hello.txt", "abs", "rel", "out", "fifo", "", "x/y", "deep.bin"]


def random_message(rnd: random.Random, fids: list[int]) -> bytes:
    """A T-message of a real type whose fields are drawn from small pools (so they often name
    live fids and real files) and sometimes cut short or garbled."""
    fields = bytearray()
    for _ in range(rnd.randrange(7)):
        kind = rnd.randrange(5)
        if kind == 0:
            fields += struct.pack("<I", rnd.choice(fids) if rnd.random() < 0.8 else rnd.getrandbits(32))
        elif kind == 1:
            name = rnd.choice(NAMES).encode()
            fields += struct.pack("<H", len(name)) + name
        elif kind == 2:
            fields += struct.pack("<Q", rnd.choice([0, 1, 4096, 1 << 63, rnd.getrandbits(64)]))
        elif kind == 3:
            fields += struct.pack("<I", rnd.choice([0, 1, 2, 0o100, 0o1000, 0o40755, 0o100644, rnd.getrandbits(32)]))
        else:
            fields += rnd.randbytes(rnd.randrange(9))
    size = p.HEADER.size + len(fields)
    if rnd.random() < 0.05:
        size = rnd.getrandbits(32)
    return p.HEADER.pack(size & 0xFFFF_FFFF, rnd.choice(MESSAGE_TYPES), rnd.getrandbits(16)) + bytes(fields)


@pytest.mark.fuzz
@given(seed=st.integers(0, 2**64 - 1), writable=st.booleans())
@settings(max_examples=fuzzing.size(25, 400), deadline=None, suppress_health_check=list(HealthCheck))
def test_random_messages_never_raise_and_never_reach_outside(tmp_path_factory: pytest.TempPathFactory,
                                                             seed: int, writable: bool) -> None:
    base = tmp_path_factory.mktemp("fuzz9p")
    share = base / "share"
    (share / "sub").mkdir(parents=True)
    (share / "hello.txt").write_text("hi")
    (share / "abs").symlink_to("/")
    (share / "rel").symlink_to("..")
    (share / "out").symlink_to(base)
    (base / "secret.txt").write_text("outside")
    before = sorted(os.listdir(base))
    server = FileServer(str(share), read_only=not writable)
    c = Client(server, msize=8192)
    root = c.attach()
    rnd = random.Random(seed)
    fids = [root, root + 1, root + 2, 7, 8]
    t = fuzzing.tally("9p server")
    try:
        for _ in range(fuzzing.size(300, 3000)):
            reply = c.raw(random_message(rnd, fids), room=rnd.choice([8192, 8192, 64, 11, 3]))
            t.add("messages")
            if reply and reply[4] != p.RLERROR:
                t.add("answered")
            assert b"outside" not in reply
            assert len(server.fids) <= 5 + len(fids) * 4 and server.open_files <= len(server.fids)
    finally:
        server.close()
    assert sorted(os.listdir(base)) == before and (base / "secret.txt").read_text() == "outside"
    assert os.stat(base / "secret.txt").st_size == 7


# --- found by review: each of these failed before its fix ----------------------------------------
def test_offsets_beyond_off_t_are_einval_not_a_broken_device(rw: tuple[Client, int]) -> None:
    c, root = rw
    f = c.walk_all(root, "hello.txt")
    c.lopen(f, RDWR)
    for attempt in (lambda: c.read(f, 1 << 63, 10), lambda: c.write(f, 1 << 63, b"x"),
                    lambda: c.setattr(f, p.ATTR_SIZE, size=1 << 63)):
        with pytest.raises(NinepError) as e:
            attempt()
        assert err(e) == errno.EINVAL


def test_lcreate_on_a_name_that_exists_never_opens_it(rw: tuple[Client, int], tree: Path) -> None:
    """A FIFO (or a host device node) where the guest creates a file: EEXIST at once, instead
    of the server blocking in open(2) for ever."""
    c, root = rw
    outcome: list[int] = []

    def create() -> None:
        try:
            c.lcreate(c.walk(root)[0], "fifo", RDWR)
        except NinepError as e:
            outcome.append(e.errno or 0)
    t = threading.Thread(target=create, daemon=True)
    t.start()
    t.join(5)
    assert not t.is_alive() and outcome == [errno.EEXIST]


def test_setattr_on_an_open_fid_acts_on_its_file_even_unlinked(rw: tuple[Client, int], tree: Path) -> None:
    c, root = rw
    f = c.walk_all(root, "hello.txt")
    c.lopen(f, RDONLY)
    held = os.open(tree / "hello.txt", os.O_RDONLY)  # the host's view of the same inode
    try:
        c.unlinkat(root, "hello.txt")
        (tree / "hello.txt").write_text("a different file now\n")  # the name is someone else's
        c.setattr(f, p.ATTR_SIZE | p.ATTR_MODE, size=5, mode=0o600)
        assert os.fstat(held).st_size == 5 and stat.S_IMODE(os.fstat(held).st_mode) == 0o600
        assert (tree / "hello.txt").read_text() == "a different file now\n"
    finally:
        os.close(held)


def test_a_guest_cannot_leave_set_id_programs_on_the_host(rw: tuple[Client, int], tree: Path) -> None:
    c, root = rw
    f, _ = c.walk(root)
    c.lcreate(f, "prog", RDWR, 0o6755)
    assert stat.S_IMODE(os.stat(tree / "prog").st_mode) & 0o6000 == 0
    c.setattr(c.walk_all(root, "hello.txt"), p.ATTR_MODE, mode=0o4755)
    assert stat.S_IMODE(os.stat(tree / "hello.txt").st_mode) == 0o755
    c.setattr(c.walk_all(root, "sub"), p.ATTR_MODE, mode=0o2775)  # on a directory: inheritance, kept
    assert os.stat(tree / "sub").st_mode & stat.S_ISGID


def test_replies_fit_the_room_and_the_msize_the_client_asked_for(ro: tuple[Client, int]) -> None:
    c, root = ro
    f = c.walk_all(root, "hello.txt")
    c.lopen(f)
    assert c.raw(p.HEADER.pack(23, p.TREAD, 5) + struct.pack("<IQI", f, 0, 100), room=7) == b""
    assert c.version(1024) == (1024, "unknown")  # below what the server can work with


def test_opaque_directories_are_served_empty(tree: Path) -> None:
    (tree / "proc").mkdir()
    (tree / "proc" / "kmsg").write_text("would block a reader")
    server = FileServer(str(tree), read_only=True, opaque=frozenset({"proc"}))
    c = Client(server)
    root = c.attach()
    d = c.walk_all(root, "proc")  # there to be mounted over
    c.lopen(d)
    assert c.listdir(d) == [".", ".."]
    new, qids = c.walk(root, "proc", "kmsg")
    assert len(qids) == 1 and new not in server.fids  # the walk stops at the opaque directory
    with pytest.raises(NinepError) as e:
        c.walk(c.walk_all(root, "proc"), "kmsg")
    assert err(e) == errno.ENOENT
    server.close()


def test_readdir_listings_are_bounded_per_share(rw: tuple[Client, int], tree: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from pyvmm.ninep import files as files_module

    c, root = rw
    for i in range(50):
        (tree / "sub" / f"f{i}").touch()
    monkeypatch.setattr(files_module, "MAX_LISTED", 120)
    fids = []
    for _ in range(5):
        d = c.walk_all(root, "sub")
        c.lopen(d)
        c.readdir(d, 0, 100)
        fids.append(d)
        assert c.server.listed <= 120
    assert sorted(c.listdir(fids[0])) == sorted([".", "..", *os.listdir(tree / "sub")])  # taken again


def test_a_name_beyond_path_max_is_still_reached(rw: tuple[Client, int], tree: Path) -> None:
    """openat2 refuses a path longer than PATH_MAX (ENAMETOOLONG); the server walks such a path one
    name at a time instead, as a guest on a writable share can make one."""
    c, root = rw
    names = [f"{i:02d}" + "d" * 240 for i in range(20)]  # about 4,900 bytes in all
    fid = root
    for name in names:
        c.mkdir(fid, name)
        fid, _ = c.walk(fid, name)
    leaf, qids = c.walk(root, *names[:16])  # a walk takes at most 16 names (P9_MAXWELEM)
    leaf, qids = c.walk(leaf, *names[16:])
    assert len(qids) == 4
    assert c.getattr(leaf)["mode"] & 0o170000 == 0o040000

"""The small initramfs `pyvmm exec` boots: a static busybox, the kernel modules the guest needs
to reach the host (virtio-mmio, 9p over virtio, virtio-rng), and an /init that hands over to
the commands the host sends. Packed as a newc cpio (Documentation/driver-api/early-userspace/
buffer-format.rst) and cached, keyed by everything that goes into it.

Modules come from the kernel's own tree (/lib/modules/RELEASE): a module listed in
modules.builtin is in the kernel already; any other is taken with the modules it depends on
(its .modinfo "depends="), decompressed here (.xz, .gz; .zst with the zstd program) because
busybox's insmod passes the bytes to init_module(2) as they are.
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import re
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pyvmm.errors import VmmError

# Required: without them the guest cannot reach its root. Optional: nice to have (entropy,
# virtio-fs, AF_VSOCK for a session given a vsock device).
REQUIRED_MODULES = ("virtio_mmio", "virtio_console", "9pnet_virtio", "9p")
OPTIONAL_MODULES = ("virtio_rng", "virtiofs", "vmw_vsock_virtio_transport")
BUSYBOX_PATHS = ("/bin/busybox", "/usr/bin/busybox", "/sbin/busybox")
EM_AARCH64, PT_INTERP = 183, 3

# The init, run by busybox sh. The host talks to it on the third virtio console (hvc2): it
# reports "up", then sources the host's setup script from the control share (mounts), reports
# "ready", and then runs each command the host asks for ("run ID": /ctl/cmd-ID.sh) with stdin
# from /dev/null and stdout and stderr through pipes into hvc0 and hvc1 (busybox cat, so the
# command sees pipes, not terminals, and every byte goes through as it is), reporting
# "start ID" and "exit ID STATUS" around it (the command's script gets the control console as
# fd 4, to report a directory it cannot enter); "quit" powers the guest off. A failure before the
# control console is there is printed on the kernel console, which the host keeps the tail of.
INIT = r"""#!/bin/busybox sh
export PATH=/bin
/bin/busybox mkdir -p /proc /sys /dev /tmp /ctl /newroot
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
up() { cut -d' ' -f1 /proc/uptime; }
say() { echo "$*" >&3; }
die() { echo "pyvmm-init: $*"; [ -e /proc/self/fd/3 ] && say "fail $*"; poweroff -f; sleep 10; }
for m in $(cat /modules/order); do insmod /modules/$m.ko || die "cannot load kernel module $m"; done
n=0
while [ ! -e /dev/hvc2 ]; do
    [ $n -ge 200 ] && die "the virtio consoles did not appear (is virtio_console in the kernel?)"
    sleep 0.05; n=$((n+1))
done
# held open for the whole run: hvc resets a terminal's settings whenever it is opened anew
exec 3<>/dev/hvc2 5<>/dev/hvc0 6<>/dev/hvc1
for fd in 3 5 6; do stty raw -echo <&$fd || die "cannot make the virtio consoles raw"; done
say "up $(up)"
grep -q '\s9p$' /proc/filesystems || die "the kernel has no 9p file system (CONFIG_9P_FS)"
mount -t 9p -o trans=virtio,version=9p2000.L,ro pyvmm-ctl /ctl || die "cannot mount the control share"
. /ctl/setup.sh
say "ready $(up)"
mkfifo /tmp/out /tmp/err
while read -r what id; do
    case "$what" in
    run)
        cat /tmp/out >&5 & o=$!
        cat /tmp/err >&6 & e=$!
        say "start $id $(up)"
        chroot /newroot /run/pyvmm/busybox sh /run/pyvmm/ctl/cmd-$id.sh </dev/null >/tmp/out 2>/tmp/err \
            4>&3 3>&- 5>&- 6>&-
        status=$?
        wait $o $e
        say "exit $id $status $(up)"
        ;;
    quit) break ;;
    esac
done <&3
sync
poweroff -f
"""


@dataclass(frozen=True)
class Module:
    name: str
    path: Path


def find_busybox() -> str:
    """A static AArch64 busybox on this host (Debian's busybox-static)."""
    for path in BUSYBOX_PATHS:
        if os.path.isfile(path):
            problem = _static_aarch64(path)
            if problem is None:
                return path
            raise VmmError(f"{path} {problem}: install Debian's busybox-static")
    raise VmmError("pyvmm exec needs a static busybox for the guest's initramfs: install Debian's busybox-static")


def _static_aarch64(path: str) -> str | None:
    """Why the ELF file at `path` cannot run alone in the guest, or None."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:
            return "is not a 64-bit ELF program"
        machine = struct.unpack_from("<H", head, 18)[0]
        if machine != EM_AARCH64:
            return "is not an AArch64 program"
        phoff, = struct.unpack_from("<Q", head, 32)
        phentsize, phnum = struct.unpack_from("<HH", head, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    for i in range(phnum):
        if struct.unpack_from("<I", table, i * phentsize)[0] == PT_INTERP:
            return "is dynamically linked"
    return None


class ModuleTree:
    """The kernel's /lib/modules/RELEASE, or nothing (a kernel with everything built in)."""

    def __init__(self, root: Path | None) -> None:
        self.root = root
        self.builtin: set[str] = set()
        self.files: dict[str, Path] = {}
        if root is None:
            return
        builtin = root / "modules.builtin"
        if builtin.is_file():
            self.builtin = {_module_name(line) for line in builtin.read_text().split()}
        for path in root.rglob("*.ko*"):
            if re.search(r"\.ko(\.(xz|gz|zst))?$", path.name):
                self.files.setdefault(_module_name(path.name), path)

    def resolve(self, required: Sequence[str] = REQUIRED_MODULES,
                optional: Sequence[str] = OPTIONAL_MODULES) -> list[Module]:
        """The modules to load, each after those it depends on; a required one that is neither
        built in nor in the tree is an error, an optional one is left out."""
        order: list[Module] = []
        seen: set[str] = set()

        def visit(name: str, required: bool) -> None:
            if name in seen or name in self.builtin:
                return
            path = self.files.get(name)
            if path is None:
                if required and self.root is not None and self.files:
                    raise VmmError(f"kernel module {name} is neither built into the kernel nor in {self.root}")
                return  # no module tree: the kernel must have it built in (init says if not)
            seen.add(name)
            found = re.search(rb"\0depends=([^\0]*)\0", b"\0" + load_module(path))
            for dep in found.group(1).decode().split(",") if found else []:
                if dep:
                    visit(_module_name(dep), True)
            order.append(Module(name, path))

        for name in required:
            visit(name, True)
        for name in optional:
            visit(name, False)
        return order


def kernel_offers(modules_root: Path | None, name: str) -> bool:
    """Whether the kernel of this module tree has module `name`, built in or as a module, read
    from the tree's index files (no walk). Without a tree nothing can be told: False."""
    if modules_root is None:
        return False
    for index in ("modules.builtin", "modules.order"):
        try:
            text = (modules_root / index).read_text()
        except OSError:
            continue
        if any(_module_name(line) == name for line in text.split()):
            return True
    return False


def _module_name(text: str) -> str:
    return os.path.basename(text).split(".ko")[0].replace("-", "_")


def load_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".xz":
        return lzma.decompress(data)
    if path.suffix == ".gz":
        return gzip.decompress(data)
    if path.suffix == ".zst":
        if shutil.which("zstd") is None:
            raise VmmError(f"kernel module {path} is zstd-compressed: install zstd to unpack it")
        return subprocess.run(["zstd", "-dc", str(path)], check=True, capture_output=True).stdout
    return data


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pyvmm"


def build(modules_root: Path | None, *, cache: Path | None = None) -> Path:
    """The initramfs for this module tree (or none), from the cache if it is there. The cache
    key is cheap to take (no walk of the tree): this code, the busybox, and the tree's own
    index files, which a kernel package rewrites whenever its modules change."""
    busybox = find_busybox()
    key = hashlib.sha256(Path(__file__).read_bytes())
    stamps = [Path(busybox)]
    if modules_root is not None:
        stamps += [modules_root, modules_root / "modules.order", modules_root / "modules.builtin"]
    for path in stamps:
        try:
            st = os.stat(path)
            key.update(f"{path} {st.st_size} {st.st_mtime_ns} {st.st_ino}\0".encode())
        except FileNotFoundError:
            key.update(f"{path} -\0".encode())
    where = cache or cache_dir()
    out = where / f"initramfs-{key.hexdigest()[:20]}.cpio"
    if out.is_file():
        return out
    modules = ModuleTree(modules_root).resolve()
    where.mkdir(parents=True, exist_ok=True)
    archive = Cpio()
    for d in ("bin", "dev", "modules"):
        archive.directory(d)
    archive.node("dev/console", 0o20600, 5, 1)  # the kernel opens it for init's stdio
    archive.file("init", INIT.encode(), 0o755)
    archive.file("bin/busybox", Path(busybox).read_bytes(), 0o755)
    for m in modules:
        archive.file(f"modules/{m.name}.ko", load_module(m.path), 0o644)
    archive.file("modules/order", (" ".join(m.name for m in modules) + "\n").encode(), 0o644)
    fd, tmp = tempfile.mkstemp(dir=where, prefix=".initramfs-")
    with os.fdopen(fd, "wb") as f:
        f.write(archive.finish())
    os.replace(tmp, out)
    return out


class Cpio:
    """A newc ("070701") cpio archive, everything owned by root."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.ino = 0

    def _entry(self, name: str, mode: int, body: bytes, rdev: tuple[int, int] = (0, 0), nlink: int = 1) -> None:
        self.ino += 1
        raw = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, nlink, 0, len(body), 0, 0, rdev[0], rdev[1], len(raw), 0)
        self.data += b"070701" + "".join(f"{v:08x}" for v in fields).encode() + raw
        self.data += bytes(-len(self.data) % 4) + body
        self.data += bytes(-len(self.data) % 4)

    def directory(self, name: str) -> None:
        self._entry(name, 0o40755, b"", nlink=2)

    def file(self, name: str, body: bytes, perm: int) -> None:
        self._entry(name, 0o100000 | perm, body)

    def node(self, name: str, mode: int, major: int, minor: int) -> None:
        self._entry(name, mode, b"", (major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, b"")
        return bytes(self.data)

"""Build the emulated arm64 host: Debian's arm64 kernel plus an initramfs with Python and pyvmm,
one image per kernel package (shapes.py: the shapes that differ only in QEMU's command share one).

Two cpio archives are concatenated at boot (the kernel unpacks each in turn, see
Documentation/driver-api/early-userspace/buffer-format.rst):
  * base.cpio   - busybox, Python and the wheels; cached, rebuilt only when its recipe changes;
  * the overlay - this checkout's files and the command to run; packed anew for every boot (~1 s).
Both are left uncompressed: under TCG the kernel's gunzip costs seconds, a memcpy costs nothing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from debian import PROVIDED, Arm64Apt, extract, merge_usr
from shapes import SHAPES, Shape
from steps import log, run_step

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout: pyvmm's initramfs code
from pyvmm.boot.kernel import parse_image, unpack_kernel  # noqa: E402
from pyvmm.errors import ImageError  # noqa: E402
from pyvmm.exec.initramfs import ModuleTree, load_module  # noqa: E402

# The emulated host's userspace is Debian's arm64 packages of the release whose CPython is the one
# building it (3.11: Debian 12 bookworm, 3.13: Debian 13 trixie). So the bytecode compiled here
# (precompile) is the host's own whatever the machine, and on each machine the KVM tier runs on
# the Python its unit tier ran on. The kernels do not follow it (shapes.py): a shape is the same
# host on every machine.
DEBIAN_PYTHONS = {(3, 11): "bookworm", (3, 13): "trixie"}


def userspace_release(python: tuple[int, int] = sys.version_info[:2]) -> tuple[str, str]:
    """(Debian release, Python version) of the emulated host built by this Python. Another
    Python (3.12, 3.14...) gets the newest of them, without precompiled bytecode (precompile)."""
    if python in DEBIAN_PYTHONS:
        return DEBIAN_PYTHONS[python], "{}.{}".format(*python)
    newest = max(DEBIAN_PYTHONS)
    return DEBIAN_PYTHONS[newest], "{}.{}".format(*newest)


def userspace_roots(python: str, release: str) -> list[str]:
    """What the emulated host runs; apt adds what they depend on (debian.Arm64Apt.resolve)."""
    roots = ["busybox-static", f"python{python}-minimal", f"libpython{python}-stdlib",
             # GDB for the stub's tests: without Python in Debian 12; Debian 13's gdb-minimal is
             # a transitional package to its gdb, which embeds the same Python
             "gdb-minimal",
             # qemu-storage-daemon, which serves -d disks: in qemu-utils from QEMU 8.0, so from
             # bookworm-backports on Debian 12 (built against Debian 12's own libraries)
             QEMU_UTILS.get(release, "qemu-utils")]
    return roots + (["virtiofsd"] if release != VIRTIOFSD_RELEASE_FROM else [])


QEMU_UTILS = {"bookworm": "qemu-utils/bookworm-backports"}


# virtio-fs's daemon. Debian 12 has none: its emulated host takes Debian 13's virtiofsd with the
# libraries it was built against (Debian 13's C library is newer than Debian 12's), kept apart in
# /opt/virtiofsd and started through their own dynamic loader by /usr/libexec/virtiofsd, where
# Debian puts the program. Nothing else in the host sees them. (A whole Debian 13 userspace would
# move the host's Python to 3.13, away from the machine's unit tier, image.py's first rule.)
VIRTIOFSD_RELEASE_FROM = "bookworm"
VIRTIOFSD_FOREIGN = ("trixie", ["virtiofsd", "libc6", "libgcc-s1", "libcap-ng0", "libseccomp2"])
VIRTIOFSD_WRAPPER = """#!/bin/sh
# Debian 13's virtiofsd on its own C library (tools/armhost/image.py)
exec /opt/virtiofsd/lib/ld-linux-aarch64.so.1 --library-path /opt/virtiofsd/lib /opt/virtiofsd/virtiofsd "$@"
"""


# Wheels the project needs at run time and for its test tier, for the host's CPython on aarch64.
BINARY_WHEELS = ["cffi", "pycparser", "ioctl-opt", "pytest", "pytest-xdist", "hypothesis"]
SDIST_WHEELS = ["pyfdt"]  # published as an sdist only: built into a pure-Python wheel here

# Parts of the stdlib no test or VMM run needs; dropping them keeps the initramfs small.
STDLIB_PRUNE = [
    "test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data",
    "distutils", "unittest/test", "sqlite3/test", "ctypes/test",
]
DOC_PRUNE = ["usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "usr/share/lintian"]

RECIPE_VERSION = "7"  # bump when the base layout changes

KERNEL_LIMIT = 512 << 20  # the most an unpacked kernel Image may be

# Kernel modules from the same package: the emulated host needs TUN for virtio-net's tap backend,
# vhost-net for its kernel data plane, vhost-vsock for --vsock (and the vsock loopback, the vsock
# benchmark's floor), the L2 guest the virtio-mmio transport and drivers (Debian builds them as
# modules; the virtio console too in 6.1, where 6.12 has it built in, and a built-in one is left
# out). Their dependencies are added and ordered from each module's .modinfo "depends=".
HOST_MODULES = ["tun", "vhost_net", "vhost_vsock", "vsock_loopback"]
GUEST_MODULES = ["virtio_mmio", "virtio_console", "virtio_blk", "virtio_rng", "virtio_net", "9pnet_virtio", "9p",
                 "virtiofs", "vmw_vsock_virtio_transport"]

# The L2 guest pyvmm boots in tests and the demo: Debian's arm64 kernel Image (the package the
# emulated host runs) and a busybox initramfs whose /init loads the virtio drivers when the device
# tree has virtio-mmio nodes, moves to the virtio console when the command line names hvc0, reports
# what the kernel found, prints a marker, runs any command given as pyvmm.run=... on the kernel
# command line (commas stand for spaces), and powers off.
GUEST_INIT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
if ls /proc/device-tree | grep -q '^virtio@'; then
    for m in $(cat /lib/modules/order); do insmod /lib/modules/$m.ko; done
fi
if grep -q 'console=hvc0' /proc/cmdline; then
    n=0; while [ ! -e /dev/hvc0 ] && [ $n -lt 50 ]; do sleep 0.1; n=$((n+1)); done
    exec </dev/hvc0 >/dev/hvc0 2>&1
fi
echo "PYVMM-GUEST: init reached after $(cut -d' ' -f1 /proc/uptime) s"
dmesg | grep -E "psci:|smp:|sdei:|SMP:|Booting Linux|virtio" | sed 's/^/PYVMM-GUEST: dmesg: /'
cmd=$(sed -n 's/.*pyvmm\.run=\([^ ]*\).*/\1/p' /proc/cmdline | tr , ' ')
[ -n "$cmd" ] && eval "$cmd"
echo "PYVMM-GUEST: powering off"
poweroff -f
"""

INIT_SCRIPT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /sbin /usr/sbin /root
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts
mount -t devpts -o ptmxmode=0666 devpts /dev/pts
mount -t tmpfs tmpfs /tmp
# transparent huge pages for shared memory on request (madvise), as for anonymous memory: guest
# RAM is a memfd when a virtio-fs daemon shares it (README, virtio-fs)
echo advise > /sys/kernel/mm/transparent_hugepage/shmem_enabled
ip link set lo up  # localhost, as on any host (the GDB stub's TCP tests connect to 127.0.0.1)
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root TMPDIR=/tmp
export LD_LIBRARY_PATH=/lib/aarch64-linux-gnu:/usr/lib/aarch64-linux-gnu
for m in $(cat /lib/modules/order); do insmod /lib/modules/$m.ko; done
export PYTHONPATH=/opt/pyvmm:/opt/site PYTHONDONTWRITEBYTECODE=1 PYVMM_IN_ARMHOST=1 PYVMM_GUEST_IMAGES=/opt/guest
# the shape's name comes with each boot's overlay: shapes that differ only in QEMU's command
# (default, gicv2) boot the same base
export PYVMM_ARMHOST_SHAPE="$(cat /opt/shape)"
echo "@@ARMHOST-UP $(cut -d' ' -f1 /proc/uptime) @@"
if [ -f /opt/run.sh ]; then cd /opt/pyvmm && sh /opt/run.sh; rc=$?; else rc=127; fi
echo "@@ARMHOST-EXIT $rc @@"
sync
poweroff -f
"""


class HostImage:
    """A shape's cached kernel + base initramfs under `cache` (git-ignored), in the shape's own
    folder; the arm64 apt tree and the wheels are shared by all shapes."""

    def __init__(self, cache: Path, shape: Shape) -> None:
        self.shape = shape
        self.release, self.python = userspace_release()
        kernel_suites = {s.suite for s in SHAPES.values()}
        self.foreign = self.release == VIRTIOFSD_RELEASE_FROM  # virtiofsd from Debian 13
        foreign_suites = {VIRTIOFSD_FOREIGN[0]} if self.foreign else set()
        self.apt = Arm64Apt(cache / "apt", sorted(kernel_suites | foreign_suites |
                                                  {self.release, f"{self.release}-updates"}), self.release)
        # one folder per Python and wheel list: checkouts of other branches sharing the cache
        # (another list) neither take this one for complete nor fetch into it at the same time
        wheel_list = hashlib.sha256(" ".join(BINARY_WHEELS + SDIST_WHEELS).encode()).hexdigest()[:12]
        self.wheels = cache / "wheels" / f"cp{self.python.replace('.', '')}-{wheel_list}"
        self.files = cache / shape.files  # shape.files "" is the cache itself
        self.kernel = self.files / "Image"
        self.modules = self.files / "modules"  # the kernel package's /lib/modules tree
        self.base = self.files / "base.cpio"
        self.stamp = self.files / "base.stamp"  # the recipe's digest, then the kernel package's name
        self.guest = self.files / "guest"  # L2 guest: Image + initrd.cpio

    def _recipe_digest(self) -> str:
        text = "\n".join([RECIPE_VERSION, self.shape.kernel_choice(), self.release, INIT_SCRIPT, GUEST_INIT,
                          *userspace_roots(self.python, self.release), *PROVIDED, VIRTIOFSD_WRAPPER,
                          VIRTIOFSD_FOREIGN[0], *VIRTIOFSD_FOREIGN[1],
                          *BINARY_WHEELS, *SDIST_WHEELS, *STDLIB_PRUNE, *HOST_MODULES, *GUEST_MODULES])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def _stamp_lines(self) -> list[str]:
        return self.stamp.read_text().split() if self.stamp.is_file() else []

    def ready(self) -> bool:
        return (self.kernel.is_file() and self.base.is_file()
                and self._stamp_lines()[:1] == [self._recipe_digest()])

    def kernel_package(self) -> str | None:
        """The versioned kernel package the image was built from (None before it is built)."""
        lines = self._stamp_lines()
        return lines[1] if self.ready() and len(lines) > 1 else None

    def build(self) -> None:
        if self.ready():
            return
        started = time.monotonic()
        shape = self.shape
        log(f"building the {shape.name} shape's image ({shape.kernel_choice()}, userspace from "
            f"{self.release}: Python {self.python}) in {self.files}")
        self.files.mkdir(parents=True, exist_ok=True)
        self.apt.update()
        kernel_pkg = self.apt.newest_kernel_package(shape.kernel_meta, shape.suite)
        userspace = self.apt.resolve(userspace_roots(self.python, self.release))
        debs = self.apt.download([(kernel_pkg, self.apt.version(kernel_pkg, shape.suite)), *userspace])
        suite, names = VIRTIOFSD_FOREIGN
        foreign = self.apt.download([(n, self.apt.version(n, suite)) for n in names]) if self.foreign else []
        self._fetch_wheels()
        staging = self.files / "staging"
        shutil.rmtree(staging, ignore_errors=True)
        kroot, root = staging / "kernel", staging / "root"
        log(f"extracting kernel {kernel_pkg}")
        extract(debs[0], kroot)
        vmlinuz = sorted((kroot / "boot").glob("vmlinuz-*"))[0]
        kind = install_kernel(vmlinuz, self.kernel)
        shutil.rmtree(self.modules, ignore_errors=True)
        release_dir = next((kroot / "lib" / "modules").iterdir())
        shutil.move(str(release_dir), self.modules)
        log(f"kernel {release_dir.name}: {kind}, {self.kernel.stat().st_size >> 20} MiB; modules "
            f"{module_formats(self.modules)}")
        log(f"extracting {len(debs) - 1} userspace packages")
        for deb in debs[1:]:
            extract(deb, root)
        merge_usr(root)
        if foreign:
            install_foreign_virtiofsd(foreign, staging / "foreign", root)
        self._build_guest(root / "usr" / "bin" / "busybox")
        self._assemble_root(root)
        install_modules(self.modules, HOST_MODULES, root / "lib" / "modules")
        shutil.copytree(self.guest, root / "opt" / "guest")
        # the kernel the host runs, where a Debian host keeps it: pyvmm exec's default kernel
        # (a hard link: cpio stores the data once)
        install_module_tree(self.modules, release_dir.name, root)
        (root / "boot").mkdir(exist_ok=True)
        os.link(root / "opt" / "guest" / "Image", root / "boot" / f"vmlinuz-{release_dir.name}")
        log("packing base initramfs")
        pack_cpio(root, self.base)
        shutil.rmtree(staging, ignore_errors=True)
        self.stamp.write_text(f"{self._recipe_digest()}\n{kernel_pkg}\n")
        log(f"base initramfs ready: {self.base.stat().st_size / 2**20:.0f} MiB, "
            f"built in {time.monotonic() - started:.0f} s")

    def _build_guest(self, busybox: Path) -> None:
        """The L2 guest images, in the shape's guest/ (default's used natively on arm64; each copied into
        its host)."""
        shutil.rmtree(self.guest, ignore_errors=True)
        self.guest.mkdir(parents=True)
        shutil.copyfile(self.kernel, self.guest / "Image")
        with tempfile.TemporaryDirectory(prefix="guest-initrd-") as tmp:
            root = Path(tmp)
            (root / "bin").mkdir()
            shutil.copy2(busybox, root / "bin" / "busybox")
            init = root / "init"
            init.write_text(GUEST_INIT)
            init.chmod(0o755)
            install_modules(self.modules, GUEST_MODULES, root / "lib" / "modules")
            pack_cpio(root, self.guest / "initrd.cpio")
        log(f"L2 guest ready: Image {self.kernel.stat().st_size >> 20} MiB, "
            f"initrd {(self.guest / 'initrd.cpio').stat().st_size >> 10} KiB")

    def _fetch_wheels(self) -> None:
        if (self.wheels / ".complete").is_file():
            return
        shutil.rmtree(self.wheels, ignore_errors=True)
        self.wheels.mkdir(parents=True)
        log("downloading aarch64 wheels: " + " ".join(BINARY_WHEELS + SDIST_WHEELS))
        pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
        run_step("pip download (aarch64 wheels)",
                 [*pip, "download", "--only-binary=:all:", "--platform", "manylinux2014_aarch64",
                  "--python-version", self.python, "--implementation", "cp", "-d", str(self.wheels),
                  *BINARY_WHEELS])
        # --use-pep517: build in an isolated environment with setuptools and wheel fetched for it.
        # Without it, a pip older than 23.1 (Debian 12's venvs have 23.0.1) builds a setup.py-only
        # sdist with the venv's own setuptools and fails with "invalid command 'bdist_wheel'"
        # unless the `wheel` package happens to be installed.
        run_step("pip wheel " + " ".join(SDIST_WHEELS),
                 [*pip, "wheel", "--no-deps", "--use-pep517", "-w", str(self.wheels), *SDIST_WHEELS])
        (self.wheels / ".complete").touch()

    def _assemble_root(self, root: Path) -> None:
        for rel in DOC_PRUNE:
            shutil.rmtree(root / rel, ignore_errors=True)
        stdlib = root / "usr" / "lib" / f"python{self.python}"
        for rel in STDLIB_PRUNE:
            shutil.rmtree(stdlib / rel, ignore_errors=True)
        site = root / "opt" / "site"
        site.mkdir(parents=True)
        for whl in sorted(self.wheels.glob("*.whl")):
            shutil.unpack_archive(whl, site, format="zip")
        (root / "usr" / "bin" / "python3").symlink_to(f"python{self.python}")
        init = root / "init"
        init.write_text(INIT_SCRIPT)
        init.chmod(0o755)
        for d in ("proc", "sys", "dev", "tmp", "root"):
            (root / d).mkdir(exist_ok=True)
        precompile(root, [stdlib, site])


def install_foreign_virtiofsd(debs: list[Path], staging: Path, root: Path) -> None:
    """Debian 13's virtiofsd and its libraries into /opt/virtiofsd, started by a wrapper at
    Debian's /usr/libexec/virtiofsd (VIRTIOFSD_FOREIGN)."""
    for deb in debs:
        extract(deb, staging)
    merge_usr(staging)
    dest = root / "opt" / "virtiofsd"
    (dest / "lib").mkdir(parents=True)
    shutil.copy2(staging / "usr" / "libexec" / "virtiofsd", dest / "virtiofsd")
    libs = staging / "usr" / "lib" / "aarch64-linux-gnu"
    for name in ("ld-linux-aarch64.so.1", "libc.so.6", "libm.so.6", "libgcc_s.so.1", "libcap-ng.so.0",
                 "libseccomp.so.2"):
        shutil.copy2(libs / name, dest / "lib" / name)  # copy2 follows the soname links
    wrapper = root / "usr" / "libexec" / "virtiofsd"
    wrapper.parent.mkdir(parents=True, exist_ok=True)
    wrapper.write_text(VIRTIOFSD_WRAPPER)
    wrapper.chmod(0o755)


def install_kernel(vmlinuz: Path, dest: Path) -> str:
    """Copy the package's kernel to `dest` as a plain arm64 Image, which QEMU's -kernel and pyvmm's
    loader both take as it is; a compressed one is unpacked by pyvmm's own loader. Returns what
    it was."""
    try:
        unpacked = unpack_kernel(str(vmlinuz), vmlinuz.name, KERNEL_LIMIT)
        data = vmlinuz.read_bytes() if unpacked is None else unpacked
        image = parse_image(data, vmlinuz.name)  # or one line saying what it is instead
    except ImageError as e:
        raise SystemExit(f"armhost: {e}") from None
    if image.headerless:
        raise SystemExit(f"armhost: {vmlinuz.name} has no arm64 Image header")
    dest.write_bytes(data)
    return "plain Image" if unpacked is None else "compressed Image, unpacked"


def module_formats(tree: Path) -> str:
    """How the package ships its modules (".ko", ".ko.xz", ...), for the build's log."""
    found = {p.name[p.name.index(".ko"):] for p in tree.rglob("*.ko*")}
    return ", ".join(sorted(found)) or "none"


def install_modules(tree: Path, names: list[str], dest: Path) -> None:
    """Decompress `names` and every module they depend on from the kernel package's module tree
    into `dest`, with dest/order listing them so that each comes after its dependencies (the
    package ships no modules.dep; busybox insmod takes them in that order)."""
    modules = ModuleTree(tree).resolve(names, ())
    dest.mkdir(parents=True, exist_ok=True)
    for m in modules:
        (dest / f"{m.name}.ko").write_bytes(load_module(m.path))
    (dest / "order").write_text(" ".join(m.name for m in modules) + "\n")


def install_module_tree(tree: Path, release: str, root: Path) -> None:
    """The modules `pyvmm exec` loads into its guests, as the kernel package lays them out
    (compressed, under lib/modules/RELEASE, with modules.builtin), so that the emulated host
    looks like any Debian host to it; the rest of the package's modules are left out."""
    dest = root / "lib" / "modules" / release
    for m in ModuleTree(tree).resolve():
        target = dest / m.path.relative_to(tree)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(m.path, target)
    for name in ("modules.builtin", "modules.order"):
        if (tree / name).is_file():
            shutil.copyfile(tree / name, dest / name)


def precompile(root: Path, dirs: list[Path]) -> None:
    """Write .pyc files with this CPython, the emulated host's own version (userspace_release).

    Under TCG, compiling the stdlib at every boot would cost many seconds. unchecked-hash pycs
    are used without comparing source timestamps (PEP 552). A Python of another version than
    the host's cannot write its bytecode: the host then compiles what it imports as it runs.
    """
    host = userspace_release()[1]
    if "{}.{}".format(*sys.version_info[:2]) != host:
        log(f"this Python is {sys.version.split()[0]}, the emulated host's is {host}: no precompiled bytecode, "
            f"so it starts slower (make PYTHON=python{host} gives it bytecode)")
        return
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-j0", "--invalidation-mode",
                    "unchecked-hash", *map(str, dirs)], check=False, stdout=subprocess.DEVNULL)


def pack_cpio(root: Path, out: Path) -> None:
    """Pack `root` as a newc cpio owned by root, as the kernel's initramfs unpacker expects."""
    tmp = out.with_suffix(".tmp")
    files = run_step(f"listing {root}", ["find", ".", "-mindepth", "1"], cwd=root, capture_output=True).stdout
    with open(tmp, "wb") as f:
        run_step(f"packing {out.name} (cpio)", ["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"], cwd=root,
                 input=files, stdout=f)
    os.replace(tmp, out)

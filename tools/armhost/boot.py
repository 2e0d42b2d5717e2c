"""Boot the emulated arm64 KVM host under qemu-system-aarch64 and run one command inside it.

The command's output comes back over the serial console; the init script prints a sentinel with
the command's exit status, then powers off. QEMU is always bounded by a time limit: a hung L1 or
L2 fails the run instead of hanging CI.
"""

from __future__ import annotations

import io
import os
import re
import selectors
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from image import pack_cpio, precompile
from shapes import Shape
from steps import log

# What of the checkout goes into the emulated host: build/pyvmm-payloads holds the assembled
# guests (the host has no assembler), and tools/armhost is there for its unit tests, which the
# KVM tier collects before deselecting them.
OVERLAY_PATHS = ["pyproject.toml", "pyvmm", "kvm_bindings", "devicetree", "tests", "examples", "benchmarks",
                 "tools/armhost", "build/pyvmm-payloads"]
EXIT_RE = re.compile(r"@@ARMHOST-EXIT (\d+) @@")
UP_RE = re.compile(r"@@ARMHOST-UP ([\d.]+) @@")


def qemu_command(kernel: Path, initrd: Path, gic: int, cpus: int, mem_mib: int) -> list[str]:
    # virtualization=on gives the guest EL2, so its kernel brings up KVM (VHE); gic-version=3 lets
    # it offer a vGICv3 to its own guests, gic-version=2 (a GICv2 with the virtualization
    # extensions, as GIC-400) only a vGICv2. mte=on: the CPU has MTE and the board tag memory, so
    # the host's KVM offers MTE to its guests as a real MTE host's does. pauth-impdef: QEMU's
    # cheap pointer-auth algorithm, much faster under TCG than the architected QARMA. -nic none:
    # the host needs no network, and the virt board's default NIC wants an option ROM
    # (efi-virtio.rom, from ipxe-qemu) that a QEMU installed without recommends does not have,
    # so QEMU would refuse to start.
    # A CPU given in ARMHOST_CPU may have no MTE, which QEMU refuses with mte=on: it goes without.
    cpu = os.environ.get("ARMHOST_CPU", "")
    mte = "" if cpu else "mte=on,"
    return [
        "qemu-system-aarch64", "-M", f"virt,virtualization=on,{mte}gic-version={gic}",
        "-cpu", cpu or "max,pauth-impdef=on", "-smp", str(cpus), "-m", str(mem_mib),
        "-nographic", "-no-reboot", "-monitor", "none", "-serial", "stdio", "-nic", "none",
        "-kernel", str(kernel), "-initrd", str(initrd),
        "-append", "console=ttyAMA0 rdinit=/init panic=-1 quiet loglevel=3",
    ]


def build_overlay(checkout: Path, command: list[str], shape: Shape, out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="armhost-overlay-") as tmp:
        root = Path(tmp)
        dest = root / "opt" / "pyvmm"
        for rel in OVERLAY_PATHS:
            src = checkout / rel
            if src.is_dir():
                shutil.copytree(src, dest / rel, ignore=shutil.ignore_patterns("__pycache__", "*.pyc",
                                                                            ".pytest_cache"))
            elif src.is_file():
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest / rel)
        precompile(root, [dest])
        (root / "opt" / "run.sh").write_text(shlex.join(command) + "\n")
        (root / "opt" / "shape").write_text(shape.name + "\n")  # image.INIT_SCRIPT exports it
        pack_cpio(root, out)


def run(shape: Shape, kernel: Path, base: Path, checkout: Path, command: list[str], *, cpus: int,
        mem_mib: int, timeout: float, on_line: Callable[[str], None] | None = None) -> int:
    """Boot the host and run `command`; its output is printed as it comes, each line also handed
    to `on_line`. Returns the command's status (124: time-out, 125: no status reported)."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="armhost-") as tmp:
        overlay = Path(tmp) / "overlay.cpio"
        build_overlay(checkout, command, shape, overlay)
        initrd = Path(tmp) / "initrd.cpio"
        with open(initrd, "wb") as out:
            for part in (base, overlay):
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
        argv = qemu_command(kernel, initrd, shape.gic, cpus, mem_mib)
        log(f"booting emulated arm64 host ({cpus} vCPUs, {mem_mib} MiB, shape {shape.name}), "
            f"time limit {timeout:.0f} s")
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        try:
            return _follow(proc, started, timeout, on_line)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def _follow(proc: subprocess.Popen[bytes], started: float, timeout: float,
            on_line: Callable[[str], None] | None) -> int:
    assert isinstance(proc.stdout, io.BufferedReader)  # a pipe with the default buffering: it has read1()
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    buf = b""
    status: int | None = None
    while True:
        left = started + timeout - time.monotonic()
        if left <= 0:
            log(f"time limit of {timeout:.0f} s reached: stopping QEMU")
            return 124
        if not sel.select(min(left, 5.0)):
            continue
        chunk = proc.stdout.read1(65536)
        if not chunk:
            break
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for raw in lines:
            line = raw.decode(errors="replace").rstrip("\r")
            if m := UP_RE.search(line):
                log(f"emulated host up after {time.monotonic() - started:.1f} s "
                    f"(kernel uptime {m.group(1)} s)")
                continue
            if m := EXIT_RE.search(line):
                status = int(m.group(1))
                continue
            if status is None:  # after the sentinel only the kernel's power-down chatter follows
                print(line, flush=True)
                if on_line is not None:
                    on_line(line)
    proc.wait()
    if status is None:
        log(f"emulated host stopped without reporting a status (QEMU exit {proc.returncode})")
        return 125
    log(f"emulated host finished in {time.monotonic() - started:.1f} s, status {status}")
    return status

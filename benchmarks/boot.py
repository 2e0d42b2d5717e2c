"""Booting Linux: time from `pyvmm run` to the guest's init, and pyvmm's memory.

The guest is Debian's arm64 kernel with the busybox initramfs (2 vCPUs, 256 MiB), the run the
CLI a user types. Measured per run:
  to init     wall time from starting `python3 -m pyvmm run` to the guest's init marker;
  to guest    wall time until pyvmm enters the guest (interpreter, imports, VM set-up, loading);
  kernel      the guest's own uptime at the marker; the rest (to init - to guest - kernel) is
              the kernel's work before its clock starts plus the exits pyvmm services meanwhile;
  peak RSS    pyvmm's resident memory, sampled every 20 ms: in all (what `ps` shows, the guest
              RAM the guest touched included, as for any VMM) and without the guest RAM mapping
              (pyvmm's own), against a bare interpreter's (the floor of any Python VMM).
The floor of the whole is the guest's own part, from entering it to init (the kernel's uptime
and its work before the clock starts): a VMM that started in no time would take that long. The
exits pyvmm services during the boot fall inside that part, so this ratio is pyvmm's start-up
alone; what an exit costs is in the round-trip and console figures. No C VMM's RSS is measured
here: the bare interpreter shows what a Python VMM cannot go below. The command line to repeat
the run under kvmtool is printed. Reference (issue 4): kvmtool boots the same kernel and
initramfs to init in about 5 s there.
"""

from __future__ import annotations

import os
import re
import selectors
import subprocess
import sys
import time

from benchmarks.common import median
from tests.conftest import linux_guest

RUNS = 3
MEM_MIB = 256
KVMTOOL_REFERENCE_S = 5.0
INIT_RE = re.compile(r"PYVMM-GUEST: init reached after ([\d.]+) s")


def rss(pid: int) -> tuple[int, int]:
    """Resident bytes (pyvmm's own, the guest RAM's): every mapping but the guest's RAM (the
    anonymous mapping of MEM_MIB plus its 2 MiB alignment slack), and that one."""
    own = guest = 0
    in_guest = False
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                if "-" in line.split(" ", 1)[0] and not line.startswith(("Rss", "Size")):
                    start, end = (int(v, 16) for v in line.split(" ", 1)[0].split("-"))
                    in_guest = (MEM_MIB << 20) <= end - start <= (MEM_MIB + 32) << 20
                elif line.startswith("Rss:"):
                    kib = int(line.split()[1]) << 10
                    if in_guest:
                        guest += kib
                    else:
                        own += kib
    except (FileNotFoundError, ProcessLookupError):
        return 0, 0
    return own, guest


def bare_interpreter_rss() -> int:
    """Peak resident bytes of this Python doing nothing (VmHWM: ru_maxrss would count the forked
    parent's pages too): what any Python VMM starts from."""
    code = "print(next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM')))"
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout) << 10


def command(image: object, initrd: object) -> list[str]:
    # kvmtool's default transport is PCI; pyvmm's devices are virtio-mmio, so both boot the same kind
    return ["--virtio-transport", "mmio", "-c", "2", "-m", str(MEM_MIB), "-k", str(image), "-i", str(initrd), "-p",
            "quiet"]


def one_boot() -> tuple[float, float, tuple[int, int], float]:
    """(to init, kernel uptime, (peak RSS in all, peak RSS of pyvmm's own), to guest)."""
    image, initrd = linux_guest()
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "pyvmm", "run", *command(image, initrd), "--timeout", "300",
                             "--loglevel", "info"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    out, err = proc.stdout.fileno(), proc.stderr.fileno()
    sel = selectors.DefaultSelector()
    sel.register(out, selectors.EVENT_READ)
    sel.register(err, selectors.EVENT_READ)
    buf, to_init, kernel, to_guest, peak_all, peak_own = b"", None, None, None, 0, 0
    deadline = started + 300
    while time.monotonic() < deadline:
        own, guest = rss(proc.pid)
        peak_all, peak_own = max(peak_all, own + guest), max(peak_own, own)
        ready = [key.fd for key, _ in sel.select(0.02)]
        if err in ready:
            if b"entering the guest" in os.read(err, 65536) and to_guest is None:
                to_guest = time.monotonic() - started
        if out not in ready:
            continue
        chunk = os.read(out, 65536)
        if not chunk:
            break  # the guest powered off and pyvmm exited
        buf += chunk
        if to_init is None and (m := INIT_RE.search(buf.decode(errors="replace"))):
            to_init, kernel = time.monotonic() - started, float(m.group(1))
    else:
        proc.kill()
    proc.wait()
    if proc.returncode != 0 or to_init is None or kernel is None or to_guest is None:
        raise SystemExit(f"the Linux guest did not boot (status {proc.returncode})")
    return to_init, kernel, (peak_all, peak_own), to_guest


def main() -> dict[str, float]:
    runs = [one_boot() for _ in range(RUNS)]
    to_init = median([r[0] for r in runs])
    kernel = median([r[1] for r in runs])
    total = median([r[2][0] for r in runs])
    own = median([r[2][1] for r in runs])
    to_guest = median([r[3] for r in runs])
    bare = bare_interpreter_rss()
    mib = 2**20
    print(f"\nLinux boot: Debian arm64 kernel + busybox initramfs, 2 vCPUs, {MEM_MIB} MiB, {RUNS} runs (median)")
    print(f"  pyvmm run -> guest init         {to_init:7.2f} s   ({to_init / (to_init - to_guest):.2f}x the guest's own "
          f"part, so start-up alone; {to_init / KVMTOOL_REFERENCE_S:.2f}x kvmtool's ~5 s reference)")
    print(f"  pyvmm run -> entering the guest {to_guest:7.2f} s   (interpreter, imports, VM set-up, loading)")
    print(f"  guest kernel uptime at init     {kernel:7.2f} s")
    print(f"  the rest                        {to_init - to_guest - kernel:7.2f} s   "
          "(kernel work before its clock starts, exits serviced)")
    print(f"  peak RSS, all                   {total / mib:7.1f} MiB (guest RAM the guest touched included)")
    print(f"  peak RSS, pyvmm's own           {own / mib:7.1f} MiB ({(own - bare) / mib:+.1f} MiB over a bare "
          f"interpreter's {bare / mib:.1f} MiB; target: at most 8 MiB over a C VMM's own, not measured here)")
    image, initrd = linux_guest()
    print(f"  the same under kvmtool: lkvm run {' '.join(command(image, initrd))}")
    return {"to_init_s": to_init, "kernel_s": kernel, "peak_rss_mib": own / mib}


if __name__ == "__main__":
    main()

"""Booting Linux: time from `pyvmm run` to the guest's init, and pyvmm's memory.

The guest is Debian's arm64 kernel with the busybox initramfs (2 vCPUs, 256 MiB), the run the
CLI a user types. Measured per run:
  to init     wall time from starting `python3 -m pyvmm run` to the guest's init marker;
  kernel      the guest's own uptime at that marker (what any VMM's guest spends booting);
  pyvmm       the difference: interpreter start, imports, image loading, exits serviced;
  peak RSS    pyvmm's resident memory, excluding the guest RAM mapping, sampled every 20 ms.
Reference (issue 4): kvmtool boots the same kernel and initramfs to init in about 5 s there.
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


def rss_without_guest_ram(pid: int) -> int:
    """Resident bytes of every mapping but the guest's RAM (the anonymous MEM_MIB mapping)."""
    total = 0
    skip = False
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                if "-" in line.split(" ", 1)[0] and not line.startswith(("Rss", "Size")):
                    start, end = (int(v, 16) for v in line.split(" ", 1)[0].split("-"))
                    skip = end - start == MEM_MIB << 20
                elif line.startswith("Rss:") and not skip:
                    total += int(line.split()[1]) << 10
    except (FileNotFoundError, ProcessLookupError):
        return 0
    return total


def one_boot() -> tuple[float, float, int]:
    image, initrd = linux_guest()
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "pyvmm", "run", "-c", "2", "-m", str(MEM_MIB), "-k", str(image),
                             "-i", str(initrd), "-p", "quiet", "--timeout", "300"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    buf, to_init, kernel, peak = b"", None, None, 0
    deadline = started + 300
    while time.monotonic() < deadline:
        peak = max(peak, rss_without_guest_ram(proc.pid))
        if not sel.select(0.02):
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break  # the guest powered off and pyvmm exited
        buf += chunk
        if to_init is None and (m := INIT_RE.search(buf.decode(errors="replace"))):
            to_init, kernel = time.monotonic() - started, float(m.group(1))
    else:
        proc.kill()
    proc.wait()
    if proc.returncode != 0 or to_init is None or kernel is None:
        raise SystemExit(f"the Linux guest did not boot (status {proc.returncode})")
    return to_init, kernel, peak


def main() -> dict[str, float]:
    runs = [one_boot() for _ in range(RUNS)]
    to_init = median([r[0] for r in runs])
    kernel = median([r[1] for r in runs])
    peak = median([r[2] for r in runs])
    print(f"Linux boot: Debian arm64 kernel + busybox initramfs, 2 vCPUs, {MEM_MIB} MiB, {RUNS} runs (median)")
    print(f"  pyvmm run -> guest init         {to_init:7.2f} s   ({to_init / KVMTOOL_REFERENCE_S:.2f}x kvmtool's ~5 s)")
    print(f"  of which the guest kernel       {kernel:7.2f} s   (its uptime at init)")
    print(f"  of which pyvmm                  {to_init - kernel:7.2f} s   (start-up, loading, exits)")
    print(f"  pyvmm peak RSS without guest RAM {peak / 2**20:6.1f} MiB")
    return {"to_init_s": to_init, "kernel_s": kernel, "peak_rss_mib": peak / 2**20}


if __name__ == "__main__":
    main()

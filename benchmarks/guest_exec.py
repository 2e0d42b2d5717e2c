"""`pyvmm exec`.

  exec -- true   wall time of `python3 -m pyvmm exec -c 2 -m 256 -- true` (the default kernel),
                 split by what pyvmm logs at --loglevel info: pyvmm start-up (to entering the
                 guest), kernel boot (to the init's "up"), initramfs (modules, mounts: to
                 "ready"), the command (start to exit), power-off and teardown; compared with
                 boot.py's plain boot to init in the same run (target: within 1.2x).
How the host's files themselves reach the guest is shares.py's.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time

from benchmarks.common import median
from pyvmm.exec.session import LinuxSession

RUNS = 3
TARGET_RATIO = 1.2
STAMP = re.compile(r"pyvmm: (entering the guest|guest init up|guest init ready|command 1: start|command 1: exit)")


def one_exec() -> dict[str, float]:
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "pyvmm", "exec", "-c", "2", "-m", "256", "--loglevel", "info",
                             "--timeout", "300", "--", "true"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stderr is not None
    marks: dict[str, float] = {}
    for line in proc.stderr:
        if (m := STAMP.search(line)) is not None:
            marks.setdefault(m.group(1), time.monotonic() - started)
    proc.wait()
    marks["end"] = time.monotonic() - started
    if proc.returncode != 0 or len(marks) != 6:
        raise SystemExit(f"pyvmm exec -- true failed (status {proc.returncode}, saw {sorted(marks)})")
    return marks


def timed_in_guest(session: LinuxSession, command: str) -> tuple[float, str]:
    """Run `command` in the guest; its duration by the guest's clock, and its stdout."""
    script = f"a=$(cut -d' ' -f1 /proc/uptime); {command}; b=$(cut -d' ' -f1 /proc/uptime); echo \"@ $a $b\""
    done = session.run(["sh", "-c", script], timeout=600)
    if done.status != 0:
        raise SystemExit(f"guest command failed ({done.status}): {command}: {done.stderr.decode(errors='replace')}")
    *out, stamps = done.stdout.decode().strip().split("\n")
    _, a, b = stamps.split()
    return float(b) - float(a), "\n".join(out)


def main(plain_to_init: float | None = None) -> None:
    runs = [one_exec() for _ in range(RUNS)]
    m = {k: median([r[k] for r in runs]) for k in runs[0]}
    total = m["end"]
    print(f"pyvmm exec -- true: the default kernel, 2 vCPUs, 256 MiB, {RUNS} runs (median)")
    verdict = ""
    if plain_to_init:
        ratio = total / plain_to_init
        verdict = (f"   ({ratio:.2f}x the plain boot to init: target {TARGET_RATIO}x "
                   f"{'met' if ratio <= TARGET_RATIO else 'NOT met'})")
    print(f"  total wall time                 {total:7.2f} s{verdict}")
    print(f"  pyvmm start-up                  {m['entering the guest']:7.2f} s   (to entering the guest)")
    print(f"  kernel boot                     {m['guest init up'] - m['entering the guest']:7.2f} s   (to the init's first word)")
    print(f"  initramfs                       {m['guest init ready'] - m['guest init up']:7.2f} s   (modules, mounts)")
    print(f"  the command                     {m['command 1: exit'] - m['command 1: start']:7.2f} s")
    print(f"  hand-over and power-off         {total - m['guest init ready'] - (m['command 1: exit'] - m['command 1: start']):7.2f} s")


if __name__ == "__main__":
    main()

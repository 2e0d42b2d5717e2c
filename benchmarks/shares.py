"""The host's files in the guest: virtio-9p (cache=loose, cache=none) and virtio-fs (virtiofsd,
--cache always, as `pyvmm exec` mounts it), each row against the same run's host-side floor.

  read     a 32 MiB host file, dd bs=1M (256 MiB on a native host);
  find     `find /usr | wc -l`;
  import   python3 -S importing json, email.parser, http.client and unittest from the share
           (chrooted into it, so that everything it loads comes over the share).
Every step starts cold: the guest drops its caches, and so does the host where it may. The
figures are the guest's own clock (medians of RUNS); the guest commands are printed so that they
can be repeated under kvmtool (`lkvm run --9p /,root`), whose times the goals compare with:
9p at most 1.0x kvmtool's in every row, virtio-fs at least 3x faster than kvmtool's 9p
(cache=loose) on find and import and 2x on read.
"""

from __future__ import annotations

import os
import subprocess
import time

from benchmarks.common import ROOT, median
from benchmarks.guest_exec import timed_in_guest
from pyvmm.exec.session import LinuxSession
from pyvmm.exec.shares import MSIZE

RUNS = int(os.environ.get("PYVMM_BENCH_SHARE_RUNS", "2"))
BIG_MIB = int(os.environ.get("PYVMM_BENCH_9P_MIB", "32" if os.environ.get("PYVMM_IN_ARMHOST") else "256"))
IMPORT = "python3 -S -c 'import json, email.parser, http.client, unittest'"
NINEP_MOUNT = "/tmp/p9"


def rows(root: str, big: str) -> list[tuple[str, str]]:
    """(name, command) of each row, on the host's files seen at `root` ("" for the host's /)."""
    chroot = f"chroot {root} " if root else ""
    return [(f"read a {BIG_MIB} MiB file", f"dd if={root}{big} of=/dev/null bs=1M 2>/dev/null"),
            ("find /usr | wc -l", f"find {root}/usr | wc -l"),
            ("python3 -S imports", chroot + IMPORT)]


def host_floor(commands: list[tuple[str, str]]) -> list[float]:
    """Each command on the host itself, cold where the host lets its caches be dropped."""
    out = []
    for _, command in commands:
        times = []
        for _ in range(RUNS):
            drop_host_caches()
            started = time.monotonic()
            subprocess.run(["sh", "-c", command], check=True, stdout=subprocess.DEVNULL)
            times.append(time.monotonic() - started)
        out.append(median(times))
    return out


def drop_host_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def in_guest(session: LinuxSession, commands: list[tuple[str, str]]) -> list[float]:
    out = []
    for _, command in commands:
        times = []
        for _ in range(RUNS):
            drop_host_caches()
            session.run("sync; echo 3 > /proc/sys/vm/drop_caches", timeout=120)  # not timed
            seconds, _ = timed_in_guest(session, f"{command} >/dev/null")
            times.append(seconds)
        out.append(median(times))
    return out


def ninep_rows(big: str) -> dict[str, list[float]]:
    """9p in the machine `pyvmm exec --share 9p` makes (anonymous RAM), the host's / mounted again
    by the guest with each cache mode."""
    from pyvmm.devices.virtio.p9 import Virtio9p
    from pyvmm.machine.vm import Vm

    def add_share(vm: Vm) -> None:  # the host's / once more (a 9p tag is mounted once at a time)
        vm.add_virtio(Virtio9p("/", "bench9p", read_only=True, opaque=frozenset({"proc", "sys", "dev"})))

    results = {}
    with LinuxSession(cpus=2, mem_mib=512, share="9p", configure=add_share) as session:
        session.start(timeout=300)
        for cache in ("loose", "none"):
            timed_in_guest(session, f"mkdir -p {NINEP_MOUNT} && mount -t 9p -o trans=virtio,version=9p2000.L,"
                                    f"msize={MSIZE},ro,cache={cache} bench9p {NINEP_MOUNT}")
            results[f"9p, cache={cache}"] = in_guest(session, rows(NINEP_MOUNT, big))
            timed_in_guest(session, f"umount {NINEP_MOUNT}")
    return results


def main() -> None:
    from pyvmm.devices.virtio.vhost_user import virtiofsd

    where = ROOT / "build" / "bench-shares"
    where.mkdir(parents=True, exist_ok=True)
    big = where / "big.bin"
    with open(big, "wb") as f:
        for _ in range(BIG_MIB):
            f.write(os.urandom(1 << 20))
    try:
        floor = host_floor(rows("", str(big)))
        results = ninep_rows(str(big))
        if virtiofsd.find() is not None:
            with LinuxSession(cpus=2, mem_mib=512, share="fs") as session:  # the root over virtio-fs
                session.start(timeout=300)
                results["virtio-fs, virtiofsd --cache always"] = in_guest(session, rows("", str(big)))
    finally:
        big.unlink()
    cold = "" if drop_host_caches() else "; the host's caches could not be dropped (not root)"
    print(f"the host's files in the guest: 2 vCPUs, 512 MiB, median of {RUNS}, every step cold{cold}")
    names = [name for name, _ in rows("", str(big))]
    print(f"  {'':34}" + "".join(f"{n:>22}" for n in names))
    print(f"  {'host floor (the host itself)':34}" + "".join(f"{s:>20.2f} s" for s in floor))
    for label, times in results.items():
        cells = "".join(f"{t:>9.2f} s {t / f:>8.1f}x" for t, f in zip(times, floor, strict=True))
        print(f"  {label:34}{cells}")
    if virtiofsd.find() is None:
        print(f"  {'virtio-fs':34}not measured: no virtiofsd on this host")
    print(f"  {'':34}" + "".join(f"{'(time, x the floor)':>22}" for _ in names))
    print("  the same under kvmtool: lkvm run --virtio-transport mmio -c 2 -m 512 --9p /,root -k IMAGE -i INITRD, then in the guest\n"
          f"    mount -t 9p -o trans=virtio,version=9p2000.L,msize={MSIZE},cache=MODE root /mnt and, each after\n"
          "    echo 3 > /proc/sys/vm/drop_caches: " + "; ".join(c for _, c in rows("/mnt", str(big))))
    print("  goals: 9p at most 1.0x kvmtool's time in every row; virtio-fs at least 3x faster than kvmtool's 9p "
          "(cache=loose) on find and the imports, 2x on the read")


if __name__ == "__main__":
    main()

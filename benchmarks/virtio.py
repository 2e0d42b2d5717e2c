"""virtio inside the Linux guest: virtio-blk sequential throughput and virtio-net ping latency.

One boot of Debian's kernel (1 vCPU, 256 MiB) with a raw disk image in the host's /tmp and a
virtio-net NIC on a tap whose host end is 192.168.77.1. The guest runs the commands printed
below, so the same measurement can be repeated under kvmtool on the same image and host:
  lkvm run -c 1 -m 256 -k Image -i initrd.cpio -d IMAGE -n mode=tap,tapif=TAP -p "..."
Reference (the emulated host's notes): a kvmtool-style C VMM's virtio-blk reads ~140-170 MB/s
and writes ~85-100 MB/s there with these dd commands. kvmtool itself is not built here (the
project commits no build script for fetched code), so the ratio below is against that range.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

from benchmarks.common import median
from pyvmm.boot import boot
from pyvmm.devices.virtio.blk import VirtioBlk
from pyvmm.devices.virtio.net import VirtioNet, parse_network
from pyvmm.vm import Vm
from tests.conftest import linux_guest

DISK_MIB = 64
RUNS = 5
TAP = "pyvmmbench0"
HOST_IP, GUEST_IP = "192.168.77.1", "192.168.77.2"
KVMTOOL_READ_MBS = (140.0, 170.0)
KVMTOOL_WRITE_MBS = (85.0, 100.0)

WRITE = f"dd if=/dev/zero of=/dev/vda bs=1M count={DISK_MIB} oflag=direct"
READ = f"dd if=/dev/vda of=/dev/null bs=1M count={DISK_MIB} iflag=direct"
PING = f"ping -c 20 -i 0.2 {HOST_IP}"
NET_UP = f"ip addr add {GUEST_IP}/24 dev eth0; ip link set eth0 up"
TIMED_RE = re.compile(r"BENCH-(WRITE|READ) ([\d.]+) ([\d.]+)")
RTT_RE = re.compile(r"round-trip min/avg/max = ([\d.]+)/([\d.]+)/([\d.]+) ms")


def timed(name: str, command: str) -> str:
    """`command` between two reads of the guest's uptime (busybox dd prints no rate)."""
    return f"read t0 x </proc/uptime; {command}; read t1 x </proc/uptime; echo BENCH-{name} $t0 $t1"


def guest_script() -> str:
    steps = [NET_UP]
    for _ in range(RUNS):
        steps += [timed("WRITE", WRITE), timed("READ", READ)]
    steps.append(f"echo BENCH-PING; {PING}")
    return "; ".join(steps)


def run_guest() -> str:
    image, initrd = linux_guest()
    out = bytearray()
    with tempfile.TemporaryDirectory(prefix="pyvmm-bench-") as tmp:
        disk = os.path.join(tmp, "disk.img")
        with open(disk, "wb") as f:  # allocated, as an image made with dd or qemu-img is
            for _ in range(DISK_MIB):
                f.write(bytes(1 << 20))
        with Vm(cpus=1, mem_mib=256, console=out.append) as vm:
            vm.add_virtio(VirtioBlk(disk))
            vm.add_virtio(VirtioNet(parse_network(f"mode=tap,tapif={TAP}")))
            for args in (["addr", "add", f"{HOST_IP}/24", "dev", TAP], ["link", "set", TAP, "up"]):
                subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)
            cmd = guest_script().replace("; ", ";").replace(" ", ",")
            boot(vm, kernel=str(image), initrd=str(initrd), cmdline=f"console=ttyS0 quiet pyvmm.run={cmd}")
            result = vm.run(timeout=600)
    text = out.decode(errors="replace")
    if not result.ok:
        raise SystemExit(f"the benchmark guest failed: {result}\n{text[-2000:]}")
    return text


def throughputs(text: str, name: str) -> list[float]:
    """MB/s (10^6 bytes) of each timed dd run called `name`."""
    out = [(DISK_MIB << 20) / (float(t1) - float(t0)) / 1e6
           for kind, t0, t1 in TIMED_RE.findall(text) if kind == name]
    if len(out) != RUNS:
        raise SystemExit(f"expected {RUNS} {name} timings:\n{text[-1500:]}")
    return out


def main() -> None:
    text = run_guest()
    writes, reads = throughputs(text, "WRITE"), throughputs(text, "READ")
    rtt = RTT_RE.search(text.split("BENCH-PING")[-1])
    if rtt is None:
        raise SystemExit(f"no ping result:\n{text[-1500:]}")
    read, write = median(reads), median(writes)
    print(f"\nvirtio in the Linux guest (1 vCPU, {DISK_MIB} MiB raw image in host /tmp, median of {RUNS}):")
    print("  guest commands (each dd timed by reading /proc/uptime before and after):")
    print(f"    {WRITE}")
    print(f"    {READ}")
    print(f"    {NET_UP}; {PING}   (host end {HOST_IP} on tap {TAP})")
    lo, hi = KVMTOOL_READ_MBS
    print(f"  virtio-blk sequential read   {read:7.1f} MB/s  runs {', '.join(f'{v:.1f}' for v in reads)}"
          f"  ({read / hi:.2f}x-{read / lo:.2f}x of kvmtool's {lo:.0f}-{hi:.0f} MB/s reference)")
    lo, hi = KVMTOOL_WRITE_MBS
    print(f"  virtio-blk sequential write  {write:7.1f} MB/s  runs {', '.join(f'{v:.1f}' for v in writes)}"
          f"  ({write / hi:.2f}x-{write / lo:.2f}x of kvmtool's {lo:.0f}-{hi:.0f} MB/s reference)")
    print(f"  virtio-net ping round trip   min/avg/max {rtt.group(1)}/{rtt.group(2)}/{rtt.group(3)} ms (20 pings)")


if __name__ == "__main__":
    main()

"""Devices inside the Linux guest: virtio-blk throughput, the serial console, virtio-net latency.

One boot of Debian's kernel (1 vCPU, 256 MiB) with a raw disk image in the host's /tmp and a
virtio-net NIC on a tap whose host end is 192.168.77.1. The guest runs the commands printed
below (the whole kvmtool command line is printed too), so the same measurement can be repeated
under kvmtool on the same image and host. Floors, in the same run:
  virtio-blk  the host's own sequential pwrite/pread of the same image file, 1 MiB at a time,
              opened as pyvmm (and kvmtool, without its `direct` option) open it, through the
              host's page cache: the most a VMM's virtio-blk on that file can move;
  console     microseconds per byte the guest writes to ttyS0 (the 8250 UART), over the UART
              exits per byte counted in the run, gives microseconds per exit, against one
              forwarded round trip at the native floor (KVM_RUN and one register write).
The exit counters add one Python call to each exit they count, small against the exit itself.
Reference (the emulated host's notes): a kvmtool-style C VMM's virtio-blk reads ~140-170 MB/s
and writes ~85-100 MB/s there with these dd commands. kvmtool itself is not built here (the
project commits no build script for fetched code), so that ratio is against the range.
"""

from __future__ import annotations

import mmap
import os
import re
import shlex
import subprocess
import tempfile
import time
from collections.abc import Callable

from benchmarks.common import median
from benchmarks.hypercall import native_floor_us
from pyvmm.boot.load import boot
from pyvmm.devices.bus import MmioBus, MmioDevice
from pyvmm.devices.virtio.blk import DiskSpec, VirtioBlk
from pyvmm.devices.virtio.net import VirtioNet, parse_network
from pyvmm.devices.virtio.rings.chain import Chain
from pyvmm.devices.virtio.vhost_user import storage_daemon
from pyvmm.devices.virtio.vhost_user_blk import VhostUserBlk
from pyvmm.machine.vm import Vm
from tests.conftest import linux_guest

DISK_MIB = 64
RUNS = 5
TAP = "pyvmmbench0"
HOST_IP, GUEST_IP = "192.168.77.1", "192.168.77.2"
KVMTOOL_READ_MBS = (140.0, 170.0)
KVMTOOL_WRITE_MBS = (85.0, 100.0)

WRITE = f"dd if=/dev/zero of=/dev/vda bs=1M count={DISK_MIB} oflag=direct"
READ = f"dd if=/dev/vda of=/dev/null bs=1M count={DISK_MIB} iflag=direct"
SMALL_READS = 1024  # one 4 KiB request at a time: the per-request cost, not the bandwidth
READ_4K = f"dd if=/dev/vda of=/dev/null bs=4k count={SMALL_READS} iflag=direct"
READ_4K_QSD = READ_4K.replace("/dev/vda", "/dev/vdb")  # the same image, served by qemu-storage-daemon
PING = f"ping -c 20 -i 0.2 {HOST_IP}"
CONSOLE_BYTES = 4096
CONSOLE = f"head -c {CONSOLE_BYTES} /dev/zero >/dev/ttyS0"
NET_UP = f"ip addr add {GUEST_IP}/24 dev eth0; ip link set eth0 up"
TIMED_RE = re.compile(r"BENCH-(WRITE|READ|READ4K|QSD4K|CONSOLE) ([\d.]+) ([\d.]+)")
RTT_RE = re.compile(r"round-trip min/avg/max = ([\d.]+)/([\d.]+)/([\d.]+) ms")


def timed(name: str, command: str) -> str:
    """`command` between two reads of the guest's uptime (busybox dd prints no rate)."""
    return f"read t0 x </proc/uptime; {command}; read t1 x </proc/uptime; echo BENCH-{name} $t0 $t1"


def guest_script(qsd: bool) -> str:
    # loops, not copies: the whole script must fit the kernel's command line (2048 bytes on arm64)
    runs = " ".join(str(n) for n in range(RUNS))
    steps = [NET_UP,
             f"for run in {runs}; do {timed('WRITE', WRITE)}; {timed('READ', READ)}; {timed('READ4K', READ_4K)}; "
             + (f"{timed('QSD4K', READ_4K_QSD)}; " if qsd else "") + "done",
             f"for run in 1 2 3; do {timed('CONSOLE', CONSOLE)}; done"]
    steps.append(f"echo BENCH-PING; {PING}")
    return "; ".join(steps)


def cmdline(qsd: bool) -> str:
    """The guest's command line: the bench initramfs runs pyvmm.run= (commas stand for spaces)."""
    return "console=ttyS0 quiet pyvmm.run=" + guest_script(qsd).replace("; ", ";").replace(" ", ",")


def host_file_floor(disk: str) -> tuple[float, float]:
    """MB/s of the host writing then reading the whole image itself, 1 MiB per call, opened
    the way VirtioBlk opens it."""
    buf = mmap.mmap(-1, 1 << 20)
    fd = os.open(disk, os.O_RDWR)
    try:
        started = time.perf_counter()
        for n in range(DISK_MIB):
            os.pwritev(fd, [buf], n << 20)
        os.fsync(fd)
        write = (DISK_MIB << 20) / (time.perf_counter() - started) / 1e6
        started = time.perf_counter()
        for n in range(DISK_MIB):
            os.preadv(fd, [buf], n << 20)
        read = (DISK_MIB << 20) / (time.perf_counter() - started) / 1e6
    finally:
        os.close(fd)
        buf.close()
    return write, read


def host_4k_floor_us(disk: str) -> float:
    """Microseconds of one 4 KiB pread of the image by the host itself, opened the way VirtioBlk
    opens it (through the page cache), over the same span the guest reads."""
    fd = os.open(disk, os.O_RDONLY)
    try:
        started = time.perf_counter()
        for n in range(SMALL_READS):
            os.pread(fd, 4096, n << 12)
        return (time.perf_counter() - started) / SMALL_READS * 1e6
    finally:
        os.close(fd)


class CountedBlk(VirtioBlk):
    """virtio-blk counting the requests it serves."""

    requests = 0

    def _request(self, chain: Chain) -> int:
        self.requests += 1
        return super()._request(chain)


class RegisterExits:
    """Counts the MMIO exits to one device's registers (wraps its read and write, and the hot
    registers the bus answers for it without them)."""

    def __init__(self, device: MmioDevice, bus: MmioBus) -> None:
        self.count = 0
        read, write = device.read, device.write
        for addr, hot in list(bus.hot_reads.items()):
            mapping = bus.find(addr)
            if mapping is not None and mapping.device is device:
                bus.hot_reads[addr] = self._counted_hot(hot)

        def counted_read(offset: int, size: int) -> int:
            self.count += 1
            return read(offset, size)

        def counted_write(offset: int, size: int, value: int) -> None:
            self.count += 1
            write(offset, size, value)

        # instance attributes shadow the methods the bus calls (benchmark instrumentation only)
        setattr(device, "read", counted_read)  # noqa: B010
        setattr(device, "write", counted_write)  # noqa: B010

    def _counted_hot(self, hot: Callable[[], int]) -> Callable[[], int]:
        def counted() -> int:
            self.count += 1
            return hot()
        return counted


def host_tap_setup() -> list[list[str]]:
    """The host end of the guest's NIC, as kvmtool also leaves it to the user (tapif=)."""
    return [["ip", "addr", "add", f"{HOST_IP}/24", "dev", TAP], ["ip", "link", "set", TAP, "up"]]


def run_guest(qsd: bool) -> tuple[str, list[tuple[float, float]], float, tuple[int, int, int, int]]:
    image, initrd = linux_guest()
    out = bytearray()
    with tempfile.TemporaryDirectory(prefix="pyvmm-bench-") as tmp:
        disk = os.path.join(tmp, "disk.img")
        with open(disk, "wb") as f:  # allocated, as an image made with dd or qemu-img is
            for _ in range(DISK_MIB):
                f.write(bytes(1 << 20))
        floors = [host_file_floor(disk) for _ in range(RUNS)]
        floor_4k_us = median([host_4k_floor_us(disk) for _ in range(RUNS)])
        with Vm(cpus=1, mem_mib=256, console=out.append, shared_memory=True) as vm:
            blk = CountedBlk(disk)
            exits = RegisterExits(vm.add_virtio(blk), vm.mmio)
            # the same image again as vdb, on qemu-storage-daemon (nolock: vda holds the lock)
            if qsd:
                # its hot InterruptStatus counted too, so that both disks pay the counter's frame
                RegisterExits(vm.add_virtio(VhostUserBlk.open(DiskSpec(disk, lock=False, backend="qsd"))), vm.mmio)
            uart_exits = RegisterExits(vm.serial.uart, vm.mmio)
            vm.add_virtio(VirtioNet(parse_network(f"mode=tap,tapif={TAP}")))
            for argv in host_tap_setup():
                done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
                if done.returncode:
                    raise SystemExit(f"{shlex.join(argv)} failed: {done.stderr.strip()}")
            boot(vm, kernel=str(image), initrd=str(initrd), cmdline=cmdline(qsd))
            result = vm.run(timeout=600)
    text = out.decode(errors="replace")
    if not result.ok:
        raise SystemExit(f"the benchmark guest failed: {result}\n{text[-2000:]}")
    return text, floors, floor_4k_us, (exits.count, blk.requests, uart_exits.count, len(out))


def durations(text: str, name: str, runs: int) -> list[float]:
    """Seconds (the guest's clock) of each timed run called `name`."""
    out = [float(t1) - float(t0) for kind, t0, t1 in TIMED_RE.findall(text) if kind == name]
    if len(out) != runs:
        raise SystemExit(f"expected {runs} {name} timings:\n{text[-1500:]}")
    return out


def throughputs(text: str, name: str) -> list[float]:
    """MB/s (10^6 bytes) of each timed dd run called `name`."""
    return [(DISK_MIB << 20) / seconds / 1e6 for seconds in durations(text, name, RUNS)]


def main(floor_us: float) -> None:
    qsd = storage_daemon.find() is not None
    text, floors, floor_4k_us, (register_exits, requests, uart_exits, output_bytes) = run_guest(qsd)
    writes, reads = throughputs(text, "WRITE"), throughputs(text, "READ")
    small_us = [seconds / SMALL_READS * 1e6 for seconds in durations(text, "READ4K", RUNS)]
    host_write, host_read = median([f[0] for f in floors]), median([f[1] for f in floors])
    console_s = median(durations(text, "CONSOLE", 3))
    rtt = RTT_RE.search(text.split("BENCH-PING")[-1])
    if rtt is None:
        raise SystemExit(f"no ping result:\n{text[-1500:]}")
    read, write = median(reads), median(writes)
    print(f"\ndevices in the Linux guest (1 vCPU, {DISK_MIB} MiB raw image in host /tmp, median of {RUNS}):")
    print("  guest commands (each timed by reading /proc/uptime before and after):")
    print(f"    {WRITE}")
    print(f"    {READ}")
    print(f"    {READ_4K}")
    if qsd:
        print(f"    {READ_4K_QSD}   (vdb: the same image, served by qemu-storage-daemon)")
    print(f"    {CONSOLE}")
    print(f"    {NET_UP}; {PING}   (host end {HOST_IP} on tap {TAP})")
    image, initrd = linux_guest()
    print(f"  the same under kvmtool, DISK a {DISK_MIB} MiB file of zeros in the host's /tmp, after creating tap {TAP}"
          f" and {'; '.join(shlex.join(argv) for argv in host_tap_setup())}:")
    print(f"    lkvm run --virtio-transport mmio -c 1 -m 256 -k {image} -i {initrd} -d DISK -d DISK -n mode=tap,tapif={TAP} -p {shlex.quote(cmdline(qsd))}")
    lo, hi = KVMTOOL_READ_MBS
    print(f"  virtio-blk sequential read   {read:7.1f} MB/s  runs {', '.join(f'{v:.1f}' for v in reads)}"
          f"  ({read / host_read:.2f}x the host's own {host_read:.0f} MB/s; {read / hi:.2f}x-{read / lo:.2f}x "
          f"kvmtool's {lo:.0f}-{hi:.0f})")
    lo, hi = KVMTOOL_WRITE_MBS
    print(f"  virtio-blk sequential write  {write:7.1f} MB/s  runs {', '.join(f'{v:.1f}' for v in writes)}"
          f"  ({write / host_write:.2f}x the host's own {host_write:.0f} MB/s; {write / hi:.2f}x-{write / lo:.2f}x "
          f"kvmtool's {lo:.0f}-{hi:.0f})")
    small = median(small_us)
    print(f"  virtio-blk 4 KiB read        {small:7.0f} us per request  runs {', '.join(f'{v:.0f}' for v in small_us)}"
          f"  ({small / floor_4k_us:.0f}x the host's own 4 KiB pread, {floor_4k_us:.1f} us: the guest's block layer,"
          f" one kick, one interrupt and the device's work)")
    if qsd:
        qsd_us = [seconds / SMALL_READS * 1e6 for seconds in durations(text, "QSD4K", RUNS)]
        on_qsd = median(qsd_us)
        print(f"  ... on qemu-storage-daemon  {on_qsd:7.0f} us per request  runs {', '.join(f'{v:.0f}' for v in qsd_us)}"
              f"  ({on_qsd / floor_4k_us:.0f}x the host's own 4 KiB pread; {on_qsd / small:.2f}x pyvmm's worker in the"
              f" same boot)")
    else:
        print(f"  ... on qemu-storage-daemon  not measured: no {storage_daemon.NAME} ({storage_daemon.PACKAGE})")
    print(f"  virtio-blk register exits    {register_exits / requests:7.2f} per request ({register_exits} for {requests}"
          f" requests, the whole run; notifications take an ioeventfd, so these are interrupt status and"
          f" acknowledgement)")
    us_per_byte = console_s / CONSOLE_BYTES * 1e6
    per_byte = uart_exits / output_bytes  # the whole run: the console runs are most of its output
    print(f"  serial console output        {CONSOLE_BYTES / console_s:7.0f} bytes/s ({us_per_byte:.0f} us per byte; "
          f"{per_byte:.2f} UART exits per byte of the run's output, so {us_per_byte / per_byte:.0f} us per exit: "
          f"{us_per_byte / per_byte / floor_us:.2f}x one forwarded round trip at the native floor)")
    print(f"  virtio-net ping round trip   min/avg/max {rtt.group(1)}/{rtt.group(2)}/{rtt.group(3)} ms (20 pings)")


if __name__ == "__main__":
    main(native_floor_us())

"""virtio-net in the Linux guest: pyvmm's own data plane and the kernel's vhost-net side by side.

One boot of Debian's kernel (1 vCPU, 256 MiB) with two NICs, each on a tap of its own: one that
pyvmm serves (`vhost=0`), one that vhost-net serves. Through each, the guest fetches a file from
an HTTP server on the host and posts one back (busybox wget, timed with the guest's clock), and
pings the host. The floors, in the same run: the same server's transfers over the host's own
loopback, and the host pinging itself. The guest's script is printed, with the kvmtool command
line that repeats it; `python3 -m benchmarks.net --serve` is the host's side for that (the
server on PORT).
"""

from __future__ import annotations

import argparse
import http.server
import io
import os
import re
import shlex
import subprocess
import tarfile
import tempfile
import threading
import time
import urllib.request
from typing import NamedTuple

from benchmarks.common import median
from benchmarks.virtio import timed
from pyvmm.boot.load import boot
from pyvmm.devices.virtio.blk import VirtioBlk
from pyvmm.devices.virtio.net import VirtioNet, parse_network
from pyvmm.devices.virtio.vhost_net import VhostNet, open_nic
from pyvmm.machine.vm import Vm
from tests.conftest import linux_guest

BLOB_MIB = 16
RUNS = 3
PORT = 8765
PING_RE = re.compile(r"(?:round-trip|rtt) min/avg/max(?:/mdev)? = ([\d.]+)/([\d.]+)/([\d.]+)")  # busybox, iputils
TRANSFER_RE = re.compile(r"BENCH-((?:DOWN|UP)-[\w-]+) ([\d.]+) ([\d.]+)")


class Nic(NamedTuple):
    name: str
    tap: str
    mac: str
    subnet: str  # the host is .1, the guest .2


NICS = (Nic("pyvmm", "pyvmmbench1", "02:15:15:15:15:31", "192.168.75"),
        Nic("vhost-net", "pyvmmbench2", "02:15:15:15:15:32", "192.168.74"))


class Blob(http.server.BaseHTTPRequestHandler):
    """GET: BLOB_MIB MiB; POST: read and dropped."""

    blob = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.blob)))
        self.end_headers()
        self.wfile.write(self.blob)

    def do_POST(self) -> None:
        left = int(self.headers["Content-Length"])
        while left:
            left -= len(self.rfile.read(min(left, 1 << 20)))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def guest_script(port: int) -> str:
    lines = ['nic() { for d in /sys/class/net/eth*; do [ "$(cat $d/address)" = "$1" ] && echo ${d##*/}; done; }',
             # text: busybox wget posts strlen() bytes of the file
             f"yes 0123456789abcdef | head -c {BLOB_MIB << 20} >/tmp/up"]
    for n in NICS:
        lines.append(f"d=$(nic {n.mac}); ip addr add {n.subnet}.2/24 dev $d; ip link set $d up")
    for _ in range(RUNS):  # the two NICs in turn, run after run
        for n in NICS:
            url = f"http://{n.subnet}.1:{port}"
            lines.append(timed(f"DOWN-{n.name}", f"wget -q -O /dev/null {url}/blob"))
            lines.append(timed(f"UP-{n.name}", f"wget -q -O /dev/null --post-file /tmp/up {url}/up"))
    lines += [f"echo BENCH-PING-{n.name}; ping -c 20 -i 0.2 {n.subnet}.1" for n in NICS]
    return "\n".join(lines) + "\n"


def script_disk(path: str, script: str) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("net.sh")
        info.size = len(script)
        tar.addfile(info, io.BytesIO(script.encode()))
    with open(path, "wb") as f:
        f.write(buf.getvalue().ljust(64 << 10, b"\0"))


def loopback_floor(port: int) -> tuple[float, float]:
    """MB/s of the host fetching and posting the blob over its own loopback."""
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    with urllib.request.urlopen(f"{url}/blob", timeout=60) as r:
        r.read()
    down = (BLOB_MIB << 20) / (time.monotonic() - started) / 1e6
    started = time.monotonic()
    with urllib.request.urlopen(urllib.request.Request(f"{url}/up", data=bytes(BLOB_MIB << 20)), timeout=60) as r:
        r.read()
    return down, (BLOB_MIB << 20) / (time.monotonic() - started) / 1e6


def ping_floor() -> float:
    """Milliseconds of the host's own ping round trip (avg of 20), with the guest's options."""
    done = subprocess.run(["ping", "-c", "20", "-i", "0.2", "127.0.0.1"], capture_output=True, text=True, timeout=60)
    rtt = PING_RE.search(done.stdout)
    if rtt is None:
        raise SystemExit(f"the host's ping gave no round trip: {done.stdout[-500:]}{done.stderr[-500:]}")
    return float(rtt.group(2))


def run_guest(port: int) -> str:
    image, initrd = linux_guest()
    out = bytearray()
    with tempfile.TemporaryDirectory(prefix="pyvmm-bench-") as tmp, \
            Vm(cpus=1, mem_mib=256, console=out.append) as vm:
        disk = os.path.join(tmp, "script.img")
        script_disk(disk, guest_script(port))
        vm.add_virtio(VirtioBlk(disk, read_only=True))
        plain, vhost = (open_nic(parse_network(f"mode=tap,tapif={n.tap},guest_mac={n.mac},vhost={v}"))
                        for n, v in zip(NICS, (0, 1), strict=True))
        for nic in (plain, vhost):
            vm.add_virtio(nic)
        if not isinstance(plain, VirtioNet) or not isinstance(vhost, VhostNet):
            raise SystemExit("the net benchmark needs /dev/vhost-net (load vhost_net)")
        for n in NICS:
            for argv in (["ip", "addr", "add", f"{n.subnet}.1/24", "dev", n.tap], ["ip", "link", "set", n.tap, "up"]):
                subprocess.run(argv, check=True, capture_output=True, timeout=30)
        boot(vm, kernel=str(image), initrd=str(initrd),
             cmdline="console=ttyS0 quiet pyvmm.run=tar,-xf,/dev/vda,-C,/tmp;sh,/tmp/net.sh")
        result = vm.run(timeout=900)
    text = out.decode(errors="replace")
    if not result.ok:
        raise SystemExit(f"the net benchmark guest failed: {result}\n{text[-2000:]}")
    return text


def mbs(text: str, name: str) -> float:
    """Median MB/s of the timed transfers called `name`."""
    runs = [(BLOB_MIB << 20) / (float(t1) - float(t0)) / 1e6 for kind, t0, t1 in TRANSFER_RE.findall(text) if kind == name]
    if len(runs) != RUNS:
        raise SystemExit(f"expected {RUNS} {name} timings:\n{text[-1500:]}")
    return median(runs)


def serve() -> http.server.ThreadingHTTPServer:
    Blob.blob = os.urandom(BLOB_MIB << 20)
    server = http.server.ThreadingHTTPServer(("0.0.0.0", PORT), Blob)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main() -> None:
    server = serve()
    port = PORT
    try:
        floors = [loopback_floor(port) for _ in range(RUNS)]
        ping_ms = ping_floor()
        text = run_guest(port)
    finally:
        server.shutdown()
        server.server_close()
    floor_down, floor_up = median([f[0] for f in floors]), median([f[1] for f in floors])
    print(f"\nvirtio-net, pyvmm's data plane and vhost-net in one guest (1 vCPU; HTTP, {BLOB_MIB} MiB, median of {RUNS}):")
    print(f"  floor: the host's own loopback  down {floor_down:7.1f} MB/s   up {floor_up:7.1f} MB/s   "
          f"ping avg {ping_ms:.3f} ms")
    rows = {}
    for n in NICS:
        rtt = PING_RE.search(text.split(f"BENCH-PING-{n.name}")[-1])
        if rtt is None:
            raise SystemExit(f"no ping result for {n.name}:\n{text[-1500:]}")
        down, up = mbs(text, f"DOWN-{n.name}"), mbs(text, f"UP-{n.name}")
        rows[n.name] = (down, up, float(rtt.group(2)))
        print(f"  {n.name:10} down {down:7.1f} MB/s ({down / floor_down:.3f}x the floor)   up {up:7.1f} MB/s "
              f"({up / floor_up:.3f}x)   ping avg {rtt.group(2)} ms ({float(rtt.group(2)) / ping_ms:.1f}x the floor; "
              f"min {rtt.group(1)}, max {rtt.group(3)}, 20 pings)")
    (pd, pu, pr), (vd, vu, vr) = rows["pyvmm"], rows["vhost-net"]
    print(f"  vhost-net / pyvmm: down {vd / pd:.2f}x   up {vu / pu:.2f}x   round trip {vr / pr:.2f}x the time")
    image, initrd = linux_guest()
    print("  the same under kvmtool, after the same tap set-up (ip addr add SUBNET.1/24 dev TAP; ip link set TAP up),"
          f" with `python3 -m benchmarks.net --serve` on the host (port {PORT}) and net.sh below in a tar image DISK:")
    print(f"    lkvm run --virtio-transport mmio -c 1 -m 256 -k {image} -i {initrd} -d DISK "
          + " ".join(f"-n mode=tap,tapif={n.tap},guest_mac={n.mac},vhost={v}" for n, v in zip(NICS, (0, 1), strict=True))
          + " -p " + shlex.quote("console=ttyS0 quiet pyvmm.run=tar,-xf,/dev/vda,-C,/tmp;sh,/tmp/net.sh"))
    print("  net.sh:\n" + "".join(f"    {line}\n" for line in guest_script(port).splitlines()))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python3 -m benchmarks.net")
    parser.add_argument("--serve", action="store_true", help=f"only serve the blob on port {PORT} (for kvmtool)")
    if parser.parse_args().serve:
        serve()
        threading.Event().wait()  # until interrupted
    else:
        main()

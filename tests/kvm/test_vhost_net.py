"""The kernel's vhost-net moves a Linux guest's frames (pyvmm/devices/virtio/vhost_net.py): the
guest pings the host and moves a file each way over HTTP through it, beside a NIC whose
/dev/vhost-net could not be opened, which fell back to pyvmm's own data plane with one line; then
`reboot -f`, and the vhost-net NIC works again in the next boot (its rings stopped with
GET_VRING_BASE and set up anew)."""

from __future__ import annotations

import hashlib
import http.server
import io
import logging
import os
import subprocess
import tarfile
import threading
from pathlib import Path

import pytest

from pyvmm.devices.virtio.blk import VirtioBlk
from pyvmm.devices.virtio.net import VirtioNet, parse_network
from pyvmm.devices.virtio.vhost_net import VhostNet, open_nic
from pyvmm.machine.host import HOST_NOTES
from tests.kvm.conftest import NEEDS_VHOST_NET
from tests.kvm.test_virtio_linux import linux_vm, run_linux

pytestmark = NEEDS_VHOST_NET

VHOST_TAP, PYVMM_TAP = "pyvmmvh0", "pyvmmvh1"
VHOST_MAC, PYVMM_MAC = "02:15:15:15:15:20", "02:15:15:15:15:21"

# the guest's side, from a tar image on /dev/vda, at each boot (counted on /dev/vdb, which a reset
# leaves alone): each NIC found by its MAC
SCRIPT = """
n=$(dd if=/dev/vdb bs=512 count=1 2>/dev/null | tr -dc 0-9)
n=$(( ${{n:-0}} + 1 ))
printf '%s' "$n" | dd of=/dev/vdb bs=512 count=1 conv=sync,fsync 2>/dev/null
nic() {{ for d in /sys/class/net/*; do [ "$(cat $d/address)" = "$1" ] && basename $d; done; }}
v=$(nic {vhost_mac}); p=$(nic {pyvmm_mac})
ip addr add 192.168.79.2/24 dev $v && ip link set $v up
ip addr add 192.168.80.2/24 dev $p && ip link set $p up
ping -c 3 -W 10 192.168.79.1 >/dev/null; echo "VHOST-PING-RC:$? BOOT:$n"
[ "$n" -gt 1 ] && exit 0
ping -c 3 -W 10 192.168.80.1 >/dev/null; echo "PYVMM-PING-RC:$?"
wget -q -O /tmp/down http://192.168.79.1:{port}/down; echo "DOWN:$(sha256sum /tmp/down | cut -d' ' -f1)"
dd if=/dev/urandom bs=64k count=4 2>/dev/null | od -An -tx1 >/tmp/up  # text: busybox posts strlen() bytes
echo "UP:$(sha256sum /tmp/up | cut -d' ' -f1)"
wget -q -O /dev/null --post-file /tmp/up http://192.168.79.1:{port}/up; echo "UP-RC:$?"
reboot -f
"""


class Files(http.server.BaseHTTPRequestHandler):
    """GET: the file for the guest; POST: the guest's file, kept."""

    down = b""
    up: list[bytes] = []

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.down)))
        self.end_headers()
        self.wfile.write(self.down)

    def do_POST(self) -> None:
        self.up.append(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def test_vhost_net_pings_moves_a_file_both_ways_and_survives_a_reset(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=HOST_NOTES)  # whatever an earlier test left it at
    Files.down, Files.up = os.urandom(1 << 20), []
    server = http.server.ThreadingHTTPServer(("0.0.0.0", 0), Files)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    script = SCRIPT.format(vhost_mac=VHOST_MAC, pyvmm_mac=PYVMM_MAC, port=server.server_address[1]).encode()
    disk = tmp_path / "script.img"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("net.sh")
        info.size = len(script)
        tar.addfile(info, io.BytesIO(script))
    disk.write_bytes(buf.getvalue().ljust(64 << 10, b"\0"))
    counter = tmp_path / "counter.img"
    counter.write_bytes(bytes(64 << 10))
    out = bytearray()
    try:
        with linux_vm(out) as vm:
            vm.add_virtio(VirtioBlk(str(disk), read_only=True))
            vm.add_virtio(VirtioBlk(str(counter)))
            vhost = vm.add_virtio(open_nic(parse_network(f"mode=tap,tapif={VHOST_TAP},guest_mac={VHOST_MAC}"))).device
            missing = str(tmp_path / "vhost-net")
            fallback = open_nic(parse_network(f"mode=tap,tapif={PYVMM_TAP},guest_mac={PYVMM_MAC}"), vhost_path=missing)
            vm.add_virtio(fallback)
            assert isinstance(vhost, VhostNet), "/dev/vhost-net did not open (load the vhost_net module)"
            assert isinstance(fallback, VirtioNet)
            for tap, address in ((VHOST_TAP, "192.168.79.1/24"), (PYVMM_TAP, "192.168.80.1/24")):
                ip("addr", "add", address, "dev", tap)
                ip("link", "set", tap, "up")
            text = run_linux(vm, out, "tar,-xf,/dev/vda,-C,/tmp;sh,/tmp/net.sh")
            pyvmm_frames = fallback.rx_frames
            resets = vm.resets
    finally:
        server.shutdown()
    assert resets == 1 and "VHOST-PING-RC:0 BOOT:1" in text and "VHOST-PING-RC:0 BOOT:2" in text, text[-3000:]
    assert "PYVMM-PING-RC:0" in text, text[-3000:]
    assert f"DOWN:{hashlib.sha256(Files.down).hexdigest()}" in text, text[-3000:]
    (up_sum,) = [line[3:] for line in text.splitlines() if line.startswith("UP:")]
    assert "UP-RC:0" in text and [hashlib.sha256(b).hexdigest() for b in Files.up] == [up_sum]
    assert pyvmm_frames >= 3  # the fallback NIC's frames went through pyvmm
    assert [r.getMessage() for r in caplog.records if "vhost" in r.getMessage()] == [
        f"virtio-net: no vhost-net ({missing}: No such file or directory): pyvmm moves the frames of tap {PYVMM_TAP}"]

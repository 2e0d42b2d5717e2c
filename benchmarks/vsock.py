"""virtio-vsock through the kernel's vhost-vsock: what a guest gets over AF_VSOCK.

One boot of Debian's kernel (1 vCPU, 256 MiB) with a vsock device at CID and the host's root over
9p (read-only), from which the guest runs the host's python3 on benchmarks/vsock_peer.py against a
server on the host: SIZE bytes each way and one-byte round trips. The floor, in the same run: the
same program on the host against the same server through the kernel's vsock loopback (CID 1),
that is the same sockets without a guest. The kvmtool command line that repeats the guest's side
is printed; `python3 -m benchmarks.vsock --serve` is the host's side for it.
"""

from __future__ import annotations

import argparse
import re
import shlex
import socket
import subprocess
import sys
import threading
from pathlib import Path

from benchmarks import vsock_peer
from pyvmm.boot.load import boot
from pyvmm.devices.virtio.p9 import Virtio9p
from pyvmm.devices.virtio.vsock import VhostVsock
from pyvmm.errors import VmmError
from pyvmm.machine.vm import Vm
from tests.conftest import linux_guest

CID = 4242  # not 3, which a host that is itself a guest often has
PORT = 5555
VMADDR_CID_LOCAL = 1  # the vsock loopback (vsock_loopback.ko)
PEER = Path(vsock_peer.__file__).resolve()
RESULT_RE = re.compile(r"BENCH-VSOCK-(DOWN|UP|RTT) ([\d.]+)")


def guest_command(port: int) -> str:
    """The L2 guest's pyvmm.run=...: the host's root at /mnt, the peer run from it."""
    return ("mkdir,-p,/mnt;mount,-t,9p,-o,trans=virtio,-o,version=9p2000.L,-o,cache=loose,hostroot,/mnt;"
            f"chroot,/mnt,python3,{PEER},{socket.VMADDR_CID_HOST},{port}")


def handle(conn: socket.socket) -> None:
    """One connection of vsock_peer's: its opening byte says what it measures."""
    with conn:
        op = conn.recv(1)
        if op == b"D":
            block = bytes(vsock_peer.CHUNK)
            for _ in range(vsock_peer.SIZE // vsock_peer.CHUNK):
                conn.sendall(block)
        elif op == b"U":
            left = vsock_peer.SIZE
            while left > 0:
                got = len(conn.recv(vsock_peer.CHUNK))
                if not got:
                    return
                left -= got
            conn.sendall(b"k")
        elif op == b"P":
            while byte := conn.recv(1):
                conn.sendall(byte)


def serve(port: int) -> socket.socket:
    listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    listener.bind((socket.VMADDR_CID_ANY, port))
    listener.listen(4)

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=handle, args=(conn,), daemon=True).start()
    threading.Thread(target=accept, daemon=True).start()
    return listener


def results(text: str, where: str) -> dict[str, float]:
    found = {kind: float(value) for kind, value in RESULT_RE.findall(text)}
    if len(found) != 3:
        raise SystemExit(f"the vsock benchmark's {where} gave no results:\n{text[-1500:]}")
    return found


def floor(port: int) -> dict[str, float]:
    done = subprocess.run([sys.executable, str(PEER), str(VMADDR_CID_LOCAL), str(port)], capture_output=True,
                          text=True, timeout=300)
    if done.returncode != 0:
        raise VmmError(f"the host's vsock loopback (the floor) failed: is vsock_loopback loaded? {done.stderr.strip()[-300:]}")
    return results(done.stdout, "floor (the host's vsock loopback)")


def run_guest(port: int) -> dict[str, float]:
    image, initrd = linux_guest()
    out = bytearray()
    with Vm(cpus=1, mem_mib=256, console=out.append) as vm:
        vm.add_virtio(Virtio9p("/", "hostroot", read_only=True))
        vm.add_virtio(VhostVsock(CID))
        boot(vm, kernel=str(image), initrd=str(initrd), cmdline=f"console=ttyS0 quiet pyvmm.run={guest_command(port)}")
        result = vm.run(timeout=900)
    text = out.decode(errors="replace")
    if not result.ok:
        raise SystemExit(f"the vsock benchmark guest failed: {result}\n{text[-2000:]}")
    return results(text, "guest")


def main() -> None:
    try:
        listener = serve(PORT)
    except OSError as e:  # no AF_VSOCK here: the other benchmarks go on
        print(f"\nvirtio-vsock: not measured: no vsock on this host ({e.strerror}; load vhost_vsock, vsock_loopback)")
        return
    try:
        host = floor(PORT)
        guest = run_guest(PORT)
    except VmmError as e:
        print(f"\nvirtio-vsock: not measured: {e}")
        return
    finally:
        listener.close()
    mib = vsock_peer.SIZE >> 20
    print(f"\nvirtio-vsock on vhost-vsock (1 vCPU; {mib} MiB each way, median of {vsock_peer.RUNS}; "
          f"one-byte round trips, median of {vsock_peer.ROUND_TRIPS}):")
    print(f"  floor: the host's vsock loopback  down {host['DOWN']:7.1f} MB/s   up {host['UP']:7.1f} MB/s   "
          f"round trip {host['RTT']:7.1f} us")
    print(f"  guest <-> host                    down {guest['DOWN']:7.1f} MB/s ({guest['DOWN'] / host['DOWN']:.3f}x "
          f"the floor)   up {guest['UP']:7.1f} MB/s ({guest['UP'] / host['UP']:.3f}x)   round trip "
          f"{guest['RTT']:7.1f} us ({guest['RTT'] / host['RTT']:.1f}x the floor)")
    image, initrd = linux_guest()
    print(f"  the same under kvmtool, with `python3 -m benchmarks.vsock --serve` on the host (port {PORT}):")
    print(f"    lkvm run --virtio-transport mmio -c 1 -m 256 -k {image} -i {initrd} --9p /,hostroot --vsock {CID} -p "
          + shlex.quote(f"console=ttyS0 quiet pyvmm.run={guest_command(PORT)}"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python3 -m benchmarks.vsock")
    parser.add_argument("--serve", action="store_true", help=f"only serve vsock_peer on port {PORT} (for kvmtool)")
    if parser.parse_args().serve:
        serve(PORT)
        threading.Event().wait()  # until interrupted
    else:
        main()

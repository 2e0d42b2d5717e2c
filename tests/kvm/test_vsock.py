"""virtio-vsock on the kernel's vhost-vsock (pyvmm/devices/virtio/vsock.py): a Linux guest (a
LinuxSession on the host's root, so it runs the host's python3) and the host exchange data over
AF_VSOCK, each side connecting to the other, as stream and as SOCK_SEQPACKET; again after the
guest's driver has reset the device (unbind, bind); and a second VM given the same CID is refused
in one line while the first holds it."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvmm.cli.options import EXIT_ERROR
from pyvmm.devices.virtio.vsock import VhostVsock
from pyvmm.exec.session import LinuxSession
from pyvmm.machine.vm import Vm
from tests.conftest import ROOT, errors
from tests.kvm.conftest import NEEDS_VHOST_VSOCK
from tests.kvm.test_exec import BOOT_LIMIT, kernel_options

pytestmark = NEEDS_VHOST_VSOCK

CID = 42
HOST_PORT, GUEST_PORT, SEQPACKET_PORT = 5000, 5001, 5002
SIZE = 1 << 20

# The guest's side: it listens, connects to the host (CID 2), takes SIZE bytes and sends SIZE of
# its own, then answers the host's connection, then sends two messages on a SOCK_SEQPACKET socket.
GUEST = f"""
import hashlib, os, socket
listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
listener.bind((socket.VMADDR_CID_ANY, {GUEST_PORT}))
listener.listen(1)
c = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
c.connect((socket.VMADDR_CID_HOST, {HOST_PORT}))
down = bytearray()
while len(down) < {SIZE}:
    chunk = c.recv(1 << 16)
    if not chunk:
        break
    down += chunk
print("DOWN", hashlib.sha256(down).hexdigest(), flush=True)
up = os.urandom({SIZE})
c.sendall(up)
c.close()
print("UP", hashlib.sha256(up).hexdigest(), flush=True)
s, peer = listener.accept()
question = s.recv(100)
s.sendall(question.upper())
s.close()
print("PEER", peer[0], flush=True)
p = socket.socket(socket.AF_VSOCK, socket.SOCK_SEQPACKET)
p.connect((socket.VMADDR_CID_HOST, {SEQPACKET_PORT}))
p.send(b"first")
p.send(b"second message")
print("SEQPACKET", p.recv(100).decode(), flush=True)
"""


def listening(kind: int, port: int) -> socket.socket:
    s = socket.socket(socket.AF_VSOCK, kind)
    s.bind((socket.VMADDR_CID_ANY, port))
    s.listen(1)
    s.settimeout(BOOT_LIMIT)
    return s


class Host:
    """The host's side of GUEST, in a thread: what it sent, got and saw."""

    def __init__(self) -> None:
        self.down = os.urandom(SIZE)
        self.seen: dict[str, object] = {}
        self.stream = listening(socket.SOCK_STREAM, HOST_PORT)
        self.seqpacket = listening(socket.SOCK_SEQPACKET, SEQPACKET_PORT)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, peer = self.stream.accept()
            self.seen["peer"] = peer[0]
            with conn:
                conn.sendall(self.down)
                up = bytearray()
                while chunk := conn.recv(1 << 16):
                    up += chunk
            self.seen["up"] = hashlib.sha256(up).hexdigest()
            with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as out:
                out.settimeout(60)
                for _ in range(100):  # the guest listens before it connects, so this is at most a race
                    try:
                        out.connect((CID, GUEST_PORT))
                        break
                    except ConnectionResetError:
                        threading.Event().wait(0.1)
                out.sendall(b"are you there?")
                self.seen["answer"] = out.recv(100)
            conn, _ = self.seqpacket.accept()
            with conn:
                self.seen["messages"] = [conn.recv(100), conn.recv(100)]
                conn.send(b"both")
        except OSError as e:
            self.seen["error"] = e

    def close(self) -> None:
        self.stream.close()
        self.seqpacket.close()


@pytest.fixture(scope="module")
def session() -> Iterator[tuple[LinuxSession, Path]]:
    script = ROOT / "build" / "vsock-test" / "guest.py"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(GUEST)

    def add_vsock(vm: Vm) -> None:
        vm.add_virtio_devices([VhostVsock(CID)])

    kernel = kernel_options()
    s = LinuxSession(kernel=kernel[1] if kernel else None, modules=kernel[3] if kernel else None, configure=add_vsock)
    try:
        s.start(timeout=BOOT_LIMIT)
        yield s, script
    finally:
        s.close()


def exchange(s: LinuxSession, script: Path) -> None:
    host = Host()
    try:
        done = s.run([sys.executable, str(script)], timeout=120)
        host.thread.join(30)
    finally:
        host.close()
    assert done.status == 0, done.stderr.decode()
    said = dict(line.split(" ", 1) for line in done.stdout.decode().splitlines())
    assert "error" not in host.seen, host.seen
    assert said["DOWN"] == hashlib.sha256(host.down).hexdigest()  # host -> guest
    assert host.seen["up"] == said["UP"]  # guest -> host
    assert host.seen["peer"] == CID  # the guest's packets carry its CID
    assert host.seen["answer"] == b"ARE YOU THERE?"  # the host connected to the guest
    assert said["PEER"] == "2"  # from the host, VMADDR_CID_HOST
    assert host.seen["messages"] == [b"first", b"second message"]  # SEQPACKET keeps its boundaries
    assert said["SEQPACKET"] == "both"


def test_guest_and_host_talk_both_ways(session: tuple[LinuxSession, Path]) -> None:
    exchange(*session)


def test_again_after_the_driver_resets_the_device(session: tuple[LinuxSession, Path]) -> None:
    s, script = session
    # unbinding resets the device (status 0: the rings stop); binding sets it up anew
    done = s.run("d=/sys/bus/virtio/drivers/vmw_vsock_virtio_transport; v=$(basename $d/virtio*); "
                 "echo $v > $d/unbind && echo $v > $d/bind && echo $v", timeout=60)
    assert done.status == 0 and done.stdout.startswith(b"virtio"), done.stderr
    exchange(s, script)


def test_a_second_vm_with_the_same_cid_is_refused_in_one_line(session: tuple[LinuxSession, Path],
                                                              tmp_path: Path) -> None:
    guest = tmp_path / "guest.bin"
    guest.write_bytes(bytes(16))
    p = subprocess.run([sys.executable, "-m", "pyvmm", "run", "--vsock", str(CID), "-f", str(guest)],
                       capture_output=True, timeout=120, cwd=ROOT)
    assert p.returncode == EXIT_ERROR
    assert errors(p.stderr) == [f"pyvmm: error: --vsock: context ID {CID} is taken by another VM on this host, or is the host's own"]

"""vhost-user, pyvmm's front-end side (pyvmm/devices/virtio/vhost_user/), against a back-end
played by the test on a real Unix socket: the messages and descriptors a daemon is sent, what the
guest is offered, the transport's interrupt status, and a back-end that refuses or goes away.
virtiofsd itself serves guests in tests/kvm/test_virtio_fs.py."""

from __future__ import annotations

import array
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvm_bindings.constants import KVM_IOEVENTFD_FLAG_DATAMATCH
from pyvmm.devices.virtio import mmio_registers as reg
from pyvmm.devices.virtio.device import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1
from pyvmm.devices.virtio.fs import FsSpec, VirtioFs, _config, parse_fs
from pyvmm.devices.virtio.vhost_user import protocol as vu
from pyvmm.devices.virtio.vhost_user import virtiofsd
from pyvmm.devices.virtio.vhost_user.device import memory_table
from pyvmm.devices.virtio.vhost_user.virtiofsd import root_is_rootfs, sandboxes
from pyvmm.errors import VmmError
from tests.unit.virtio_driver import RAM, RAM_SIZE, Driver, FakeVm

LOG_ALL = 1 << 26  # VHOST_F_LOG_ALL: virtiofsd offers it, for migration; no guest may get it
OFFERED = VIRTIO_F_VERSION_1 | VIRTIO_F_INDIRECT_DESC | VIRTIO_F_EVENT_IDX | vu.F_PROTOCOL_FEATURES | LOG_ALL


class Backend:
    """A vhost-user back-end that answers as virtiofsd does and records every message."""

    def __init__(self, path: Path, nack: int | None = None, config: bytes | None = None,
                 offered: int = OFFERED) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.nack = nack  # the request to refuse
        self.config, self.offered = config, offered  # GET_CONFIG's bytes (None: refused); GET_FEATURES
        self.messages: list[tuple[int, int, bytes, list[int]]] = []
        self.conn: socket.socket | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            self._answer()
        except OSError:
            pass  # the test closed the sockets under this thread: it is done with the back-end

    def _answer(self) -> None:
        conn, _ = self.listener.accept()
        self.conn = conn
        while True:
            fds = array.array("i")
            data, anc, _, _ = conn.recvmsg(vu.HEADER.size, socket.CMSG_SPACE(8 * 4))
            if not data:
                return
            for level, kind, raw in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(raw[:len(raw) - len(raw) % 4])
            request, flags, size = vu.HEADER.unpack(data)
            payload = conn.recv(size, socket.MSG_WAITALL) if size else b""
            self.messages.append((request, flags, payload, list(fds)))
            for fd in fds:
                os.close(fd)
            config = b"" if self.config is None else payload[:vu.CONFIG_HEADER.size] + self.config
            reply = {vu.GET_FEATURES: struct.pack("<Q", self.offered),
                     vu.GET_PROTOCOL_FEATURES: struct.pack("<Q", vu.PROTOCOL_F_MQ | vu.PROTOCOL_F_REPLY_ACK | 1 << 5
                                                           | vu.PROTOCOL_F_CONFIG),
                     vu.GET_CONFIG: config,
                     vu.GET_QUEUE_NUM: struct.pack("<Q", 2),
                     vu.GET_VRING_BASE: payload}.get(request)
            if reply is None and flags & vu.FLAG_NEED_REPLY:
                reply = struct.pack("<Q", 1 if request == self.nack else 0)
            if reply is not None:
                conn.sendall(vu.HEADER.pack(request, vu.VERSION | vu.FLAG_REPLY, len(reply)) + reply)

    def requests(self) -> list[int]:
        return [m[0] for m in self.messages]

    def hang_up(self) -> None:
        assert self.conn is not None
        self.conn.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.listener.close()


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[Backend]:
    b = Backend(tmp_path / "vu.sock")
    yield b
    b.close()


def wait_for(condition: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_the_rings_go_to_the_daemon_with_guest_ram_and_eventfds(backend: Backend, tmp_path: Path) -> None:
    vm = FakeVm(shared=True)
    fatal: list[str] = []
    device = VirtioFs(str(tmp_path / "vu.sock"), _config("hostfs"), "virtio-fs hostfs")
    try:
        t = vm.attach(device, fatal.append)
        assert backend.requests() == [vu.GET_FEATURES, vu.GET_PROTOCOL_FEATURES, vu.SET_PROTOCOL_FEATURES,
                                      vu.SET_OWNER, vu.GET_QUEUE_NUM]
        assert struct.unpack("<Q", backend.messages[2][2])[0] == vu.PROTOCOL_F_MQ | vu.PROTOCOL_F_REPLY_ACK
        driver = Driver(t, vm.memory)
        offered = driver.features()
        assert offered == VIRTIO_F_VERSION_1 | VIRTIO_F_INDIRECT_DESC | VIRTIO_F_EVENT_IDX  # no LOG_ALL, no bit 30
        assert bytes(device.config[:6]) == b"hostfs" and struct.unpack_from("<I", device.config, 36)[0] == 1
        driver.init()
        setup = backend.messages[5:]
        assert [m[0] for m in setup] == [vu.SET_FEATURES, vu.SET_MEM_TABLE] + [
            vu.SET_VRING_NUM, vu.SET_VRING_ADDR, vu.SET_VRING_BASE, vu.SET_VRING_CALL, vu.SET_VRING_KICK,
            vu.SET_VRING_ENABLE] * 2
        assert all(m[1] & vu.FLAG_NEED_REPLY for m in setup)  # REPLY_ACK: each one acknowledged
        assert struct.unpack("<Q", setup[0][2])[0] == offered | vu.F_PROTOCOL_FEATURES
        (region,) = [r for r in vm.memory.regions]
        nregions, _, gpa, size, uaddr, offset = struct.unpack("<IIQQQQ", setup[1][2])
        assert (nregions, gpa, size, uaddr, offset) == (1, RAM, RAM_SIZE, region.host_addr, region.offset)
        assert len(setup[1][3]) == 1  # the memfd went with it
        index, flags, desc, used, avail, log = vu.VRING_ADDR.unpack(setup[3][2])
        q = driver.queues[0]
        assert (index, desc, avail, used) == (0, vm.memory.host_address(q.desc, 1),
                                               vm.memory.host_address(q.avail, 1), vm.memory.host_address(q.used, 1))
        assert struct.unpack("<Q", setup[5][2])[0] == 0 and len(setup[5][3]) == 1  # call: the irqfd's eventfd
        # interrupts come from the daemon: the used-buffer bit reads set, and its ACK is an ioeventfd
        assert driver.read(reg.INTERRUPT_STATUS) == reg.INT_USED_BUFFER
        assert (reg.VIRTIO_MMIO_BASE + reg.INTERRUPT_ACK, 4, t._ack_fd, KVM_IOEVENTFD_FLAG_DATAMATCH,
                reg.INT_USED_BUFFER) in vm.fd.ioeventfds
        assert not set(t._kick_fds) & set(t._handlers)  # the worker leaves the kicks to the daemon
        # a device reset stops both rings; the next DRIVER_OK sets them up again
        before = len(backend.messages)
        driver.write(reg.STATUS, 0)
        assert backend.requests()[before:] == [vu.GET_VRING_BASE, vu.GET_VRING_BASE]
        driver.init()
        assert backend.requests()[before + 2:before + 4] == [vu.SET_FEATURES, vu.SET_MEM_TABLE]
        assert fatal == []
    finally:
        vm.close()


def test_a_refusal_or_a_hang_up_ends_the_run_with_one_message(tmp_path: Path) -> None:
    for what in ("nack", "hang up"):
        path = tmp_path / f"{what.replace(' ', '')}.sock"
        backend = Backend(path, nack=vu.SET_MEM_TABLE if what == "nack" else None)
        vm = FakeVm(shared=True)
        fatal: list[str] = []
        try:
            t = vm.attach(VirtioFs(str(path), _config("t"), "virtio-fs t"), fatal.append)
            if what == "nack":
                Driver(t, vm.memory).init()
                assert fatal == ["virtio-fs t: the back-end refused SET_MEM_TABLE (status 1)"]
            else:
                backend.hang_up()
                wait_for(lambda fatal=fatal: fatal)
                assert fatal == ["virtio-fs t: the virtio-fs daemon closed its vhost-user socket"]
        finally:
            vm.close()
            backend.close()


def test_shared_guest_ram_is_a_memfd_the_daemon_can_map() -> None:
    vm = FakeVm(shared=True)
    try:
        (r,) = vm.memory.regions
        vm.memory.write(RAM + 4096, b"seen by the daemon")
        assert os.pread(r.fd, 18, r.offset + 4096) == b"seen by the daemon"
    finally:
        vm.close()
    plain = FakeVm()
    try:
        assert plain.memory.regions[0].fd == -1
        with pytest.raises(vu.VhostUserError, match="Vm\\(shared_memory=True\\)"):
            memory_table(plain.memory)
    finally:
        plain.close()


@pytest.mark.parametrize("spec, parsed", [
    ("/srv,data", FsSpec("data", "/srv")),
    ("/srv,data,ro,cache=never", FsSpec("data", "/srv", read_only=True, cache="never")),
    ("socket=/run/vfsd.sock,tag=data", FsSpec("data", socket="/run/vfsd.sock")),
])
def test_fs_specs(spec: str, parsed: FsSpec) -> None:
    assert parse_fs(spec) == parsed


@pytest.mark.parametrize("spec", ["/srv", ",data", "/srv,data,rw", "/srv,data,cache=sometimes",
                                  "socket=/s", "socket=/s,tag=t,ro", "tag=t,socket="])
def test_bad_fs_specs_are_one_clear_error(spec: str) -> None:
    with pytest.raises(VmmError, match="--fs"):
        parse_fs(spec)


def test_tags_fit_the_configuration_space() -> None:
    assert len(_config("x" * 36)) == 40
    for bad in ("", "x" * 37, "a\0b"):
        with pytest.raises(VmmError, match="must be 1 to 36 bytes"):
            _config(bad)


def test_the_daemon_gets_the_strongest_sandbox_the_host_allows(tmp_path: Path) -> None:
    assert sandboxes(root_user=True, rootfs=False) == ("namespace", "chroot")
    assert sandboxes(root_user=True, rootfs=True) == ("chroot",)  # pivot_root cannot leave an initramfs
    assert sandboxes(root_user=False, rootfs=False) == ("namespace", "none")
    initramfs = tmp_path / "initramfs"
    initramfs.write_text("1 1 0:2 / / rw - rootfs rootfs rw\n22 1 0:20 / /proc rw - proc proc rw\n")
    disk = tmp_path / "disk"
    disk.write_text("22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n")
    assert root_is_rootfs(str(initramfs)) and not root_is_rootfs(str(disk))
    assert not root_is_rootfs(str(tmp_path / "missing"))


def test_a_daemon_cannot_resize_guest_ram_under_pyvmm() -> None:
    """The memfds are sealed at their size: a back-end that truncates one gets EPERM, where pyvmm's
    next access to that RAM would otherwise be a SIGBUS."""
    vm = FakeVm(shared=True)
    try:
        (r,) = vm.memory.regions
        for size in (0, r.size * 2):
            with pytest.raises(PermissionError):
                os.ftruncate(r.fd, size)
    finally:
        vm.close()


def test_a_sandbox_the_daemon_cannot_set_up_gives_way_to_the_next(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """virtiofsd started as pyvmm starts it (the socket handed over with --fd, --readonly,
    --cache), and, when it ends before it answers, started again in the next sandbox."""
    calls = tmp_path / "calls"
    fake = tmp_path / "virtiofsd"
    fake.write_text(f"""#!/bin/sh
echo "$@" >> {calls}
case "$*" in *--sandbox=namespace*) echo "Error entering sandbox: namespaces refused" >&2; exit 1;; esac
echo "no vhost-user here" >&2
exit 3
""")
    fake.chmod(0o755)
    monkeypatch.setenv("PYVMM_VIRTIOFSD", str(fake))
    monkeypatch.setattr(virtiofsd, "root_is_rootfs", lambda: False)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    with pytest.raises(VmmError) as e:
        VirtioFs.open(FsSpec("t", str(tmp_path), read_only=True, cache="never"))
    assert "virtiofsd --sandbox=chroot: no vhost-user here (exit status 3)" in str(e.value)
    tried = calls.read_text().splitlines()
    assert [next(a for a in line.split() if a.startswith("--sandbox")) for line in tried] == [
        "--sandbox=namespace", "--sandbox=chroot"]
    assert all("--readonly" in line and "--cache=never" in line and "--fd=" in line for line in tried)
    monkeypatch.setenv("PYVMM_VIRTIOFSD", str(tmp_path / "missing"))
    with pytest.raises(VmmError, match="virtiofsd is not installed"):
        VirtioFs.open(FsSpec("t", str(tmp_path)))


def test_pyvmm_check_says_whether_shared_ram_gets_huge_pages(tmp_path: Path) -> None:
    from pyvmm.cli.cmd_check import shared_thp_line

    knob = tmp_path / "shmem_enabled"
    knob.write_text("always within_size advise [never] deny force\n")
    assert "small pages only" in shared_thp_line(str(knob)) and "never" in shared_thp_line(str(knob))
    knob.write_text("always within_size [advise] never deny force\n")
    assert "transparent huge pages" in shared_thp_line(str(knob))
    assert "small pages only" in shared_thp_line(str(tmp_path / "missing"))


def test_a_back_end_lost_before_the_device_is_attached_ends_the_run(backend: Backend, tmp_path: Path) -> None:
    device = VirtioFs(str(tmp_path / "vu.sock"), _config("t"), "virtio-fs t")
    backend.hang_up()
    wait_for(device._failed.is_set)  # the watcher saw it, with no run to end yet
    vm = FakeVm(shared=True)
    fatal: list[str] = []
    try:
        vm.attach(device, fatal.append)
        assert fatal == ["virtio-fs t: the virtio-fs daemon closed its vhost-user socket"]
    finally:
        vm.close()


def test_the_configuration_space_comes_from_the_back_end(tmp_path: Path) -> None:
    """GET_CONFIG, with PROTOCOL_F_CONFIG negotiated only by a device that asks for it; an empty
    reply is a refusal, a reply of another size is malformed."""
    for config, outcome in ((bytes(range(60)), "read"), (None, "refused"), (bytes(8), "malformed")):
        path = tmp_path / f"{outcome}.sock"
        backend = Backend(path, config=config)
        connection = vu.VhostUserConnection(str(path), "virtio-blk t")
        try:
            connection.handshake(vu.PROTOCOL_F_CONFIG)
            assert struct.unpack("<Q", backend.messages[2][2])[0] & vu.PROTOCOL_F_CONFIG
            if outcome == "read":
                assert connection.get_config(60) == bytes(range(60))
                request = backend.messages[-1]
                assert request[0] == vu.GET_CONFIG and request[2] == vu.CONFIG_HEADER.pack(0, 60, 0) + bytes(60)
            else:
                with pytest.raises(vu.VhostUserError, match=f"virtio-blk t: .*{outcome}"):
                    connection.get_config(60)
        finally:
            connection.close()
            backend.close()
    backend = Backend(tmp_path / "fs.sock")  # virtio-fs does not ask for it
    connection = vu.VhostUserConnection(str(tmp_path / "fs.sock"), "virtio-fs t")
    try:
        connection.handshake()
        assert not struct.unpack("<Q", backend.messages[2][2])[0] & vu.PROTOCOL_F_CONFIG
        with pytest.raises(vu.VhostUserError, match="GET_CONFIG needs VHOST_USER_PROTOCOL_F_CONFIG"):
            connection.get_config(60)
    finally:
        connection.close()
        backend.close()

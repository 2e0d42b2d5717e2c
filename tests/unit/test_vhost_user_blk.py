"""Disks on qemu-storage-daemon (pyvmm/devices/virtio/vhost_user_blk.py, vhost_user/
storage_daemon.py): the choice of back-end (backend=qsd), the daemon's command line, what the
guest is offered, and the one-line errors, against fakes; then the real daemon serving a real
front-end and requests laid out in shared guest RAM (no KVM).

The real-daemon tests skip, saying why, where qemu-storage-daemon is missing, and fail where
PYVMM_REQUIRE_QSD=1 asks for it (make unit: tools/host-deps.sh installs it)."""

from __future__ import annotations

import logging
import os
import signal
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvmm.devices.virtio.blk import (
    VIRTIO_BLK_F_BLK_SIZE,
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    DiskSpec,
    VirtioBlk,
    lock_image,
)
from pyvmm.devices.virtio.device import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1
from pyvmm.devices.virtio.rings.layout import VIRTQ_DESC_F_NEXT
from pyvmm.devices.virtio.vhost_user import protocol as vu
from pyvmm.devices.virtio.vhost_user import storage_daemon
from pyvmm.devices.virtio.vhost_user.daemon import Daemon
from pyvmm.devices.virtio.vhost_user.storage_daemon import command
from pyvmm.devices.virtio.vhost_user_blk import (
    CONFIG_SIZE,
    VhostUserBlk,
    capacity,
    guest_features,
    host_has_mte,
    open_disks,
    shared_ram_refusal,
)
from pyvmm.errors import VmmError
from pyvmm.machine.host import HOST_NOTES
from tests.unit.virtio_driver import Driver, FakeVm

SIZE_MAX, CONFIG_WCE, MQ, LOG_ALL = 1 << 1, 1 << 11, 1 << 12, 1 << 26
# what qemu-storage-daemon 10.0's export offers (vhost-user-blk-server.c), RO aside
QSD_OFFERS = (SIZE_MAX | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_TOPOLOGY
              | CONFIG_WCE | MQ | VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES | LOG_ALL | VIRTIO_F_INDIRECT_DESC
              | VIRTIO_F_EVENT_IDX | vu.F_PROTOCOL_FEATURES | VIRTIO_F_VERSION_1)
HEADER = struct.Struct("<IIQ")


# --- pure logic ------------------------------------------------------------------------------
def test_the_daemon_gets_a_raw_image_and_pyvmms_socket() -> None:
    assert command("/usr/bin/qemu-storage-daemon", "/img/a,b.img", read_only=False, block_device=False,
                   aio="io_uring", listen_fd=7) == [
        "/usr/bin/qemu-storage-daemon",
        "--blockdev", "driver=file,node-name=disk,filename=/img/a,,b.img,cache.direct=off,aio=io_uring,locking=off,"
                      "discard=unmap,read-only=off",
        "--export", "type=vhost-user-blk,id=disk,node-name=disk,addr.type=fd,addr.str=7,writable=on,num-queues=1"]
    ro = command("qsd", "/dev/sdb", read_only=True, block_device=True, aio="threads", listen_fd=3)
    assert ro[2].startswith("driver=host_device,") and ro[2].endswith(",aio=threads,locking=off,discard=ignore,"
                                                                      "read-only=on")
    assert ro[4].endswith(",writable=off,num-queues=1")
    assert not any("format" in a or "driver=raw" in a for a in ro)  # never probed


def test_the_guest_gets_only_the_bits_pyvmm_knows_and_can_honour() -> None:
    rw = guest_features(QSD_OFFERS, read_only=False)
    assert rw == (VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_TOPOLOGY
                  | VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES)  # no SIZE_MAX, WCE, MQ, LOG_ALL
    assert guest_features(QSD_OFFERS | VIRTIO_BLK_F_RO, read_only=True) == (
        VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_TOPOLOGY | VIRTIO_BLK_F_RO)


def test_the_configuration_space_says_the_capacity() -> None:
    config = struct.pack("<QII", 2048, 0, 126).ljust(CONFIG_SIZE, b"\0")
    assert capacity(config) == 2048


def test_shared_ram_is_refused_only_to_an_mte_guest_before_linux_6_2(tmp_path: Path) -> None:
    assert shared_ram_refusal("6.1.0-18-arm64", mte=True) == (
        "Linux 6.1.0-18-arm64 shares no RAM with an MTE guest (< 6.2; --disable-mte lifts it)")
    assert shared_ram_refusal("6.1.0-18-arm64", mte=False) is None
    assert shared_ram_refusal("6.2.0", mte=True) is None and shared_ram_refusal("6.12.48+deb13-arm64", mte=True) is None
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nFeatures\t: fp asimd evtstrm aes mte mte3 sb\n")
    assert host_has_mte(str(cpuinfo))
    cpuinfo.write_text("processor\t: 0\nFeatures\t: fp asimd evtstrm aes sb\n")
    assert not host_has_mte(str(cpuinfo)) and not host_has_mte(str(tmp_path / "missing"))


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(1 << 20))
    return path


@pytest.fixture
def no_daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYVMM_QEMU_STORAGE_DAEMON", str(tmp_path / "missing"))


def test_without_the_daemon_disks_go_to_pyvmms_worker_with_nothing_to_say(image: Path, no_daemon: None,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=HOST_NOTES)
    disks = open_disks([DiskSpec(str(image), read_only=True), DiskSpec(str(image), read_only=True)], None)
    for d in disks:
        d.close()
    assert [type(d) for d in disks] == [VirtioBlk, VirtioBlk] and caplog.records == []


def test_a_disk_forced_onto_a_missing_daemon_is_one_line(image: Path, no_daemon: None) -> None:
    with pytest.raises(VmmError) as e:
        open_disks([DiskSpec(str(image), backend="python"), DiskSpec(str(image), backend="qsd")], None)
    assert str(e.value) == (f"disk {image}: backend=qsd, but no qemu-storage-daemon (Debian's qemu-utils from "
                            "QEMU 8.0 on: Debian 13, or bookworm-backports on Debian 12)")


@pytest.fixture
def fake_daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A qemu-storage-daemon that records how it was started and ends saying why, at once with
    aio=io_uring (as where io_uring is refused), after a while otherwise."""
    calls = tmp_path / "calls"
    fake = tmp_path / "qemu-storage-daemon"
    fake.write_text(f"""#!/bin/sh
echo "$@" >> {calls}
case "$*" in *aio=io_uring*) echo "qemu-storage-daemon: --blockdev ...: Unable to use io_uring" >&2; exit 1;; esac
echo "qemu-storage-daemon: no vhost-user here" >&2
exit 3
""")
    fake.chmod(0o755)
    monkeypatch.setenv("PYVMM_QEMU_STORAGE_DAEMON", str(fake))
    return calls


def test_a_daemon_that_cannot_be_started_is_one_line_and_leaves_nothing_behind() -> None:
    """A failing preexec_fn (the parent-death signal's prctl, say) is subprocess's
    SubprocessError, not an OSError: one line all the same, and the socket directory goes."""
    daemon = Daemon("pyvmm-test-")

    def refuse() -> None:
        raise OSError("prctl refused")

    with pytest.raises(VmmError) as e:
        daemon.start(lambda fd: ["/bin/true"], "virtio-blk t", refuse)
    assert str(e.value).startswith("virtio-blk t: cannot start /bin/true: ") and "\n" not in str(e.value)
    assert not os.path.exists(daemon.dir)


def test_a_daemon_without_io_uring_is_started_again_with_threads(image: Path, fake_daemon: Path) -> None:
    with pytest.raises(VmmError) as e:
        VhostUserBlk.open(DiskSpec(str(image), backend="qsd"))
    assert str(e.value).endswith("(qemu-storage-daemon aio=threads: qemu-storage-daemon: no vhost-user here "
                                 "(exit status 3))")
    assert "\n" not in str(e.value)
    tried = fake_daemon.read_text().splitlines()
    assert [next(a for a in line.split(",") if a.startswith("aio=")) for line in tried] == ["aio=io_uring",
                                                                                          "aio=threads"]
    fd = os.open(image, os.O_RDWR)
    try:
        lock_image(fd, str(image), shared=False)  # pyvmm let go of its lock
    finally:
        os.close(fd)


@pytest.mark.parametrize("backend", ["python", "qsd"])
def test_a_bad_image_is_the_same_one_line_whoever_would_serve_it(tmp_path: Path, fake_daemon: Path,
                                                                 backend: str) -> None:
    """The image is checked (and locked) by pyvmm before any daemon starts."""
    small = tmp_path / "small.img"
    small.write_bytes(bytes(100))
    held = tmp_path / "held.img"
    held.write_bytes(bytes(4096))
    holder = os.open(held, os.O_RDWR)
    lock_image(holder, str(held), shared=False)
    try:
        for path, read_only, message in (
                (tmp_path / "missing.img", False, f"disk {tmp_path / 'missing.img'}: No such file or directory"),
                (Path("/dev/null"), False, "disk /dev/null is not a file or a block device"),
                (small, False, f"disk {small} is smaller than one 512-byte sector"),
                (held, True, f"disk {held} is locked: another process, or another -d of this one, writes to it "
                             "(add ,nolock to use it anyway)")):
            with pytest.raises(VmmError) as e:
                open_disks([DiskSpec(str(path), read_only, backend=backend)], None)
            assert str(e.value) == message
    finally:
        os.close(holder)
    assert not fake_daemon.exists()  # no daemon was started


# --- the real daemon ---------------------------------------------------------------------------
@pytest.fixture
def qsd() -> str:
    found = storage_daemon.find()
    if found is None:
        why = "qemu-storage-daemon is not installed (Debian's qemu-utils; bookworm-backports on Debian 12)"
        if os.environ.get("PYVMM_REQUIRE_QSD") == "1":
            pytest.fail(f"PYVMM_REQUIRE_QSD=1, but {why}", pytrace=False)
        pytest.skip(why)
    return found


@pytest.fixture
def vm() -> Iterator[FakeVm]:
    v = FakeVm(shared=True)
    yield v
    v.close()


def test_the_daemon_serves_the_image_it_was_given(qsd: str, image: Path, vm: FakeVm) -> None:
    disk = VhostUserBlk.open(DiskSpec(str(image), backend="qsd"))
    t = vm.attach(disk)
    assert disk.offered & vu.F_PROTOCOL_FEATURES and disk.connection.protocol_features & vu.PROTOCOL_F_CONFIG
    assert capacity(disk.config) == disk.sectors == (1 << 20) // 512
    assert disk.features == VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH | \
        VIRTIO_BLK_F_TOPOLOGY | VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES
    seg_max, blk_size = struct.unpack_from("<I", disk.config, 12)[0], struct.unpack_from("<I", disk.config, 20)[0]
    assert seg_max > 0 and blk_size == 512
    # one read, one write and a flush, through rings in the memfd the daemon maps
    driver = Driver(t, vm.memory)
    driver.init(features=VIRTIO_F_VERSION_1 | disk.features)
    q = driver.queues[0]
    q.add([HEADER.pack(VIRTIO_BLK_T_IN, 0, 16)], [4096, 1])
    q.kick()
    assert driver.interrupted()
    ((head, written),) = q.wait_used()
    data_addr = vm.memory.regions[0].gpa + 0x10_0000 + 16  # the heap: the header, then the data buffer
    assert written == 4097 and vm.memory.read(data_addr, 4096) == image.read_bytes()[16 * 512:16 * 512 + 4096]
    assert vm.memory.read(data_addr + 4096, 1) == bytes((VIRTIO_BLK_S_OK,))
    q.add([HEADER.pack(VIRTIO_BLK_T_OUT, 0, 1), b"\xA5" * 512], [1])
    q.add([HEADER.pack(VIRTIO_BLK_T_FLUSH, 0, 0)], [1])
    q.kick()
    q.wait_used(2)
    assert image.read_bytes()[512:1024] == b"\xA5" * 512
    # a device reset stops the ring, and the next DRIVER_OK serves it again
    driver.init(features=VIRTIO_F_VERSION_1 | disk.features)
    q = driver.queues[0]
    q.add([HEADER.pack(VIRTIO_BLK_T_IN, 0, 1)], [512, 1])
    q.kick()
    assert q.wait_used() and image.read_bytes()[512:1024] == b"\xA5" * 512


def test_a_read_only_disk_is_read_only_in_the_daemon_too(qsd: str, image: Path, vm: FakeVm) -> None:
    disk = VhostUserBlk.open(DiskSpec(str(image), read_only=True, backend="qsd"))
    vm.attach(disk)
    assert disk.offered & VIRTIO_BLK_F_RO and disk.features & VIRTIO_BLK_F_RO
    assert not disk.features & (VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES)
    assert "read-only=on" in disk.daemon.args[2] and "writable=off" in disk.daemon.args[4]
    with pytest.raises(VmmError, match="is locked: another process, or another -d of this one, uses it"):
        VhostUserBlk.open(DiskSpec(str(image), backend="qsd"))  # pyvmm's shared lock keeps writers out


def test_a_daemon_that_dies_ends_the_run_in_one_line(qsd: str, image: Path, vm: FakeVm) -> None:
    disk = VhostUserBlk.open(DiskSpec(str(image), backend="qsd"))
    fatal: list[str] = []
    vm.attach(disk, fatal.append)
    assert disk.daemon.proc is not None
    os.kill(disk.daemon.proc.pid, signal.SIGKILL)
    disk._watcher.join(5)
    assert fatal == [f"virtio-blk {image}: qemu-storage-daemon ended (killed by signal 9)"]


def test_disks_go_to_the_worker_unless_backend_qsd(qsd: str, image: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=HOST_NOTES)
    (disk,) = open_disks([DiskSpec(str(image))], "the RAM cannot be shared")  # the worker needs no sharing
    disk.close()
    assert isinstance(disk, VirtioBlk) and not disk.needs_shared_memory and caplog.records == []
    (disk,) = open_disks([DiskSpec(str(image), backend="qsd")], None)
    try:
        assert isinstance(disk, VhostUserBlk) and disk.needs_shared_memory and caplog.records == []
    finally:
        disk.close()
    assert disk.daemon.exit_status() == 0  # ended by pyvmm, cleanly


def test_pyvmm_check_says_who_serves_disks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pyvmm.cli.cmd_check import disks_line

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("Features\t: fp asimd mte\n")
    fake = tmp_path / "qsd"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PYVMM_QEMU_STORAGE_DAEMON", str(fake))
    assert disks_line("6.12.0", str(cpuinfo)) == (f"disks (-d)      pyvmm's worker; backend=qsd: qemu-storage-daemon "
                                                  f"over vhost-user ({fake})")
    assert disks_line("6.1.0", str(cpuinfo)).startswith("disks (-d)      pyvmm's worker; backend=qsd: not for guests "
                                                        "with MTE (Linux")
    monkeypatch.setenv("PYVMM_QEMU_STORAGE_DAEMON", str(tmp_path / "missing"))
    assert disks_line("6.12.0", str(cpuinfo)) == (
        "disks (-d)      pyvmm's worker; backend=qsd: unavailable (no qemu-storage-daemon (Debian's qemu-utils from "
        "QEMU 8.0 on: Debian 13, or bookworm-backports on Debian 12))")


def test_a_looped_chain_makes_the_daemon_hang_up_and_ends_the_run_in_one_line(qsd: str, image: Path,
                                                                               vm: FakeVm) -> None:
    """libvhost-user answers a ring that breaks the rules (here a chain that loops, virtio 1.2
    §2.7.5.3.1) by dropping the front-end's connection (vu_panic) and running on. The run ends
    with one line saying so; nothing in pyvmm crashes or waits."""
    disk = VhostUserBlk.open(DiskSpec(str(image), backend="qsd"))
    fatal: list[str] = []
    t = vm.attach(disk, fatal.append)
    driver = Driver(t, vm.memory)
    driver.init(features=VIRTIO_F_VERSION_1 | disk.features)
    q = driver.queues[0]
    header = driver.buffer(HEADER.pack(VIRTIO_BLK_T_IN, 0, 0))
    q.put_desc(0, header, 16, VIRTQ_DESC_F_NEXT, 1)
    q.put_desc(1, header, 16, VIRTQ_DESC_F_NEXT, 0)  # ... and back to the first
    q.publish_head(0)
    q.kick()
    disk._watcher.join(10)
    assert disk.daemon.exit_status() is None  # the daemon runs on, listening for a front-end
    assert len(fatal) == 1 and fatal[0].startswith(
        f"virtio-blk {image}: qemu-storage-daemon dropped the connection, as it does when the guest breaks a "
        "ring's rules ("), fatal

"""Disks served by qemu-storage-daemon over vhost-user (`-d FILE,backend=qsd`):
Debian's arm64 kernel reads, writes, flushes and discards with no pyvmm code on the request path,
across a machine reset and a driver's device reset, and a daemon that dies ends the run in one
line. The guest's script travels as a tar archive on its read-only disk, as in
test_virtio_linux.py, so no shared directory is needed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyvmm import cli
from pyvmm.devices.virtio.vhost_user import storage_daemon
from pyvmm.testing.payloads import Payloads
from tests.conftest import errors, linux_guest
from tests.kvm.conftest import NEEDS_SHARED_RAM, guest
from tests.kvm.test_virtio_fs import children
from tests.kvm.test_virtio_linux import tar_image

GUEST_TIMEOUT = 180.0
RUN_SCRIPT = "tar,-xf,/dev/vdb,-C,/tmp;sh,/tmp/t.sh"  # vdb: the read-only disk holding t.sh
DATA = b"written-by-linux-01"


def daemon() -> str:
    found = storage_daemon.find()
    assert found is not None, f"qemu-storage-daemon is not installed ({storage_daemon.PACKAGE})"
    return found


def pyvmm_run(data: Path, script: Path, *extra: str) -> subprocess.Popen[str]:
    image, initrd = linux_guest()
    args = [sys.executable, "-m", "pyvmm", "run", "-m", "256", "-k", str(image), "-i", str(initrd),
            "-d", f"{data},backend=qsd", "-d", f"{script},ro,backend=qsd", *extra, "-p", f"quiet pyvmm.run={RUN_SCRIPT}",
            "--timeout", str(GUEST_TIMEOUT)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def running(pid: int) -> bool:
    """Whether process `pid` exists and has not ended (a zombie waits for its new parent)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def daemons_of(pid: int) -> list[int]:
    return [c for c in children(pid) if b"qemu-storage-daemon" in Path(f"/proc/{c}/cmdline").read_bytes()]


@NEEDS_SHARED_RAM
def test_linux_reads_writes_and_discards_through_the_daemon_across_resets(tmp_path: Path) -> None:
    """The first boot checks the read-only flag and discard, writes a block and a boot marker with
    FLUSHes, fails a write to the read-only disk, and resets the machine (`reboot -f`: the rings
    stop and are set up again). The second boot reads the block back, unbinds and binds the
    driver (a device reset, status 0) and reads it again with O_DIRECT."""
    daemon()
    data, script = tmp_path / "data.img", tmp_path / "script.img"
    data.write_bytes(bytes(1 << 20))
    tar_image(script, {"t.sh": (
        "if [ \"$(dd if=/dev/vda bs=6 count=1 2>/dev/null)\" = BOOT-1 ]; then\n"
        "  echo SECOND:$(dd if=/dev/vda bs=4096 skip=1 count=1 2>/dev/null | head -c 19)\n"
        "  dev=$(basename $(readlink /sys/block/vda/device))\n"
        "  echo $dev > /sys/bus/virtio/drivers/virtio_blk/unbind\n"
        "  echo $dev > /sys/bus/virtio/drivers/virtio_blk/bind\n"
        "  sleep 1\n"
        "  echo AFTER-RESET:$(dd if=/dev/vda bs=4096 skip=1 count=1 iflag=direct 2>/dev/null | head -c 19)\n"
        "else\n"
        "  echo RO:$(cat /sys/block/vdb/ro) DISCARD:$(cat /sys/block/vda/queue/discard_max_bytes)\n"
        f"  printf {DATA.decode()} | dd of=/dev/vda bs=4096 seek=1 conv=fsync 2>/dev/null\n"
        "  dd if=/dev/zero of=/dev/vdb count=1 conv=fsync 2>/dev/null; echo RO-WRITE:$?\n"
        "  printf BOOT-1 | dd of=/dev/vda conv=fsync,notrunc 2>/dev/null && reboot -f\n"
        "fi\n").encode()})
    before = script.read_bytes()
    p = pyvmm_run(data, script)
    out, err = p.communicate(timeout=GUEST_TIMEOUT + 60)
    assert p.returncode == cli.EXIT_OK, out[-3000:] + err
    assert errors(err) == [], err
    assert "RO:1 " in out and "RO-WRITE:1" in out, out[-3000:]
    discard = int(out.split("DISCARD:", 1)[1].split()[0])
    assert discard > 0  # VIRTIO_BLK_F_DISCARD, with the daemon's limits from GET_CONFIG
    assert f"SECOND:{DATA.decode()}" in out and f"AFTER-RESET:{DATA.decode()}" in out, out[-3000:]
    assert data.read_bytes()[4096:4096 + len(DATA)] == DATA and data.read_bytes()[:6] == b"BOOT-1"
    assert script.read_bytes() == before


@NEEDS_SHARED_RAM
def test_a_daemon_killed_mid_run_ends_the_run_with_one_line(tmp_path: Path) -> None:
    daemon()
    data, script = tmp_path / "data.img", tmp_path / "script.img"
    data.write_bytes(bytes(1 << 20))
    tar_image(script, {"t.sh": b"dd if=/dev/vda of=/dev/null count=1 iflag=direct 2>/dev/null && echo BLK-READY\n"
                                b"sleep 120\n"})
    p = pyvmm_run(data, script)
    assert p.stdout is not None
    for line in p.stdout:
        if "BLK-READY" in line:
            break
    else:
        pytest.fail(f"the guest never read its disk: {p.communicate()}")
    daemons = daemons_of(p.pid)
    assert len(daemons) == 2, daemons  # one per disk
    started = time.monotonic()
    os.kill(daemons[0], signal.SIGKILL)
    out, err = p.communicate(timeout=GUEST_TIMEOUT)
    assert p.returncode == cli.EXIT_ERROR and time.monotonic() - started < 60, err
    lines = errors(err)
    assert len(lines) == 1 and "qemu-storage-daemon ended (killed by signal 9)" in lines[0], err
    for pid in daemons[1:]:  # the other disk's daemon went with the run
        assert not Path(f"/proc/{pid}").exists() or b"qemu-storage-daemon" not in Path(f"/proc/{pid}/cmdline").read_bytes()


def test_backend_qsd_without_the_daemon_is_one_line(tmp_path: Path) -> None:
    data = tmp_path / "data.img"
    data.write_bytes(bytes(1 << 20))
    image, _ = linux_guest()
    p = subprocess.run([sys.executable, "-m", "pyvmm", "run", "-k", str(image), "-d", f"{data},backend=qsd"],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYVMM_QEMU_STORAGE_DAEMON": str(tmp_path / "none")})
    assert p.returncode == cli.EXIT_ERROR
    assert errors(p.stderr) == [f"pyvmm: error: disk {data}: backend=qsd, but no qemu-storage-daemon "
                                f"({storage_daemon.PACKAGE})"]


@NEEDS_SHARED_RAM
def test_the_daemons_go_when_pyvmm_is_killed(pyvmm_payloads: Payloads, tmp_path: Path) -> None:
    """qemu-storage-daemon outlives its client; pyvmm's SIGKILL takes its daemons with it (their
    parent-death signal), so none is left serving an image nobody locks any more."""
    daemon()
    data = tmp_path / "data.img"
    data.write_bytes(bytes(1 << 20))
    spin = str(pyvmm_payloads.build(guest("spin")))
    p = subprocess.Popen([sys.executable, "-m", "pyvmm", "run", "-f", spin, "-m", "16", "-d", f"{data},backend=qsd",
                          "--timeout", "120"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (daemons := daemons_of(p.pid)):
            assert time.monotonic() < deadline and p.poll() is None, p.communicate()
            time.sleep(0.2)
        p.kill()
        p.wait(30)
        deadline = time.monotonic() + 30
        while any(running(d) for d in daemons):
            assert time.monotonic() < deadline, f"qemu-storage-daemon {daemons} outlived pyvmm"
            time.sleep(0.2)
    finally:
        p.kill()

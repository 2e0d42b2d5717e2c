"""virtio-fs through virtiofsd: Debian's arm64 kernel mounts a host directory served by a daemon
pyvmm starts (`--fs DIR,TAG`) or by one the test starts (`--fs socket=PATH,tag=TAG`).

The guest's /init mounts the share and runs t.sh from it, so each test's guest side is a plain
shell script beside the files it works on. virtiofsd is Debian's (Debian 13's, with its own
libraries, in an emulated host whose userspace is Debian 12: tools/armhost/image.py).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvmm import cli
from pyvmm.devices.virtio.vhost_user import virtiofsd
from tests.conftest import host_shape, linux_guest
from tests.kvm.conftest import NEEDS_SHARED_RAM

pytestmark = NEEDS_SHARED_RAM

GUEST_TIMEOUT = 180.0
MOUNT = "mkdir,-p,/a;mount,-t,virtiofs,hostfs,/a||echo,MOUNT-FAILED;sh,/a/t.sh"


@pytest.fixture
def share(tmp_path: Path) -> Path:
    d = tmp_path / "share"
    d.mkdir()
    (d / "hello.txt").write_text("hello over virtio-fs\n")
    return d


def daemon() -> str:
    found = virtiofsd.find()
    assert found is not None, "virtiofsd is not installed (Debian 13: apt install virtiofsd)"
    return found


def pyvmm_run(fs: list[str], script: str, where: Path, *extra: str) -> subprocess.Popen[str]:
    (where / "t.sh").write_text(script)
    image, initrd = linux_guest()
    args = [sys.executable, "-m", "pyvmm", "run", "-m", "256", "-k", str(image), "-i", str(initrd),
            *[a for spec in fs for a in ("--fs", spec)], *extra,
            "-p", f"quiet pyvmm.run={MOUNT}", "--timeout", str(GUEST_TIMEOUT)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(p: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = p.communicate(timeout=GUEST_TIMEOUT + 60)
    return p.returncode, out, err


def test_pyvmm_starts_virtiofsd_reads_writes_and_lists(share: Path) -> None:
    """`--fs DIR,TAG`: the guest reads a host file, writes one the host sees, makes a directory
    and lists the share; a `,ro` share refuses the guest's writes."""
    ro = share.parent / "ro"
    ro.mkdir()
    (ro / "keep.txt").write_text("keep\n")
    script = ("echo READ:$(cat /a/hello.txt)\n"
              "echo written-by-linux > /a/new.txt && mkdir /a/dir\n"
              "echo LIST:$(ls /a)\n"
              "mkdir -p /b && mount -t virtiofs hostro /b && echo RO:$(cat /b/keep.txt)\n"
              "echo x > /b/keep.txt; echo RO-WRITE:$?\n"
              "head -c 3000000 /dev/urandom > /a/big.bin && echo BIG:$(md5sum < /a/big.bin)\n"
              "echo $(grep -m1 Features /proc/cpuinfo)\n")
    code, out, err = finish(pyvmm_run([f"{share},hostfs", f"{ro},hostro,ro"], script, share))
    assert code == cli.EXIT_OK, out[-3000:] + err
    assert "READ:hello over virtio-fs" in out and "\nMOUNT-FAILED" not in out, out[-3000:]
    assert "LIST:dir hello.txt new.txt t.sh" in out, out[-3000:]
    assert (share / "new.txt").read_text() == "written-by-linux\n" and (share / "dir").is_dir()
    assert "RO:keep" in out and "RO-WRITE:1" in out and (ro / "keep.txt").read_text() == "keep\n"
    assert f"BIG:{hashlib.md5((share / 'big.bin').read_bytes()).hexdigest()}" in out, out[-3000:]
    # guest RAM is a shared memfd now: the guest still has every CPU feature the host offers (MTE's
    # tags included: KVM maps shmem for an MTE guest, where it refuses other file mappings)
    features = next(line for line in out.splitlines() if line.startswith("Features")).split()
    assert ("mte" in features) == ("mte" in host_shape().cpu)


@pytest.fixture
def own_daemon(share: Path) -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    """A virtiofsd the test runs itself, on a socket path of its own."""
    sock = share.parent / "vfsd.sock"
    sandbox = virtiofsd.sandboxes(os.geteuid() == 0, virtiofsd.root_is_rootfs())[0]  # as pyvmm would start it
    proc = subprocess.Popen([daemon(), f"--socket-path={sock}", f"--shared-dir={share}", "--cache=never",
                             f"--sandbox={sandbox}", "--log-level=error"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not sock.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sock.exists(), proc.stderr.read().decode() if proc.poll() is not None and proc.stderr else "no socket"
    try:
        yield sock, proc
    finally:
        proc.kill()
        proc.wait()


def test_a_daemon_the_user_runs_serves_the_guest(share: Path, own_daemon: tuple[Path, subprocess.Popen[bytes]]) -> None:
    """`--fs socket=PATH,tag=TAG`: pyvmm attaches to it and stays out of the data path."""
    sock, proc = own_daemon
    script = "echo READ:$(cat /a/hello.txt)\necho from-guest > /a/back.txt\n"
    code, out, err = finish(pyvmm_run([f"socket={sock},tag=hostfs"], script, share))
    assert code == cli.EXIT_OK, out[-3000:] + err
    assert "READ:hello over virtio-fs" in out, out[-3000:]
    assert (share / "back.txt").read_text() == "from-guest\n"
    assert proc.wait(30) == 0  # it served pyvmm's one connection, then ended as virtiofsd does


def test_a_host_change_reaches_the_guest_as_the_cache_mode_promises(share: Path) -> None:
    """The file changes on the host (written through a 9p share of the same directory, so no
    virtio-fs daemon takes part) while the guest has it cached: cache=never sees it at once,
    cache=auto after its one-second timeouts. One guest, the same directory shared both ways."""
    script = ("echo FIRST:$(cat /a/hello.txt)\n"
              "mkdir -p /auto && mount -t virtiofs autofs /auto && echo AUTO-FIRST:$(cat /auto/hello.txt)\n"
              "mkdir -p /n && mount -t 9p -o trans=virtio,version=9p2000.L sidedoor /n\n"
              "echo changed-on-the-host > /n/hello.txt\n"
              "echo SECOND:$(cat /a/hello.txt)\n"
              "sleep 2\n"
              "echo AUTO-SECOND:$(cat /auto/hello.txt)\n")
    code, out, err = finish(pyvmm_run([f"{share},hostfs,cache=never", f"{share},autofs,cache=auto"], script, share,
                                      "--9p", f"{share},sidedoor"))
    assert code == cli.EXIT_OK, out[-3000:] + err
    assert "\nFIRST:hello over virtio-fs" in out and "\nAUTO-FIRST:hello over virtio-fs" in out, out[-3000:]
    assert "\nSECOND:changed-on-the-host" in out and "\nAUTO-SECOND:changed-on-the-host" in out, out[-3000:]


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def test_a_daemon_killed_mid_run_ends_the_run_with_one_line(share: Path) -> None:
    script = "cat /a/hello.txt >/dev/null && echo FS-READY\nsleep 120\n"
    p = pyvmm_run([f"{share},hostfs"], script, share)
    assert p.stdout is not None
    for line in p.stdout:
        if "FS-READY" in line:
            break
    else:
        pytest.fail(f"the guest never read the share: {finish(p)}")
    daemons = [c for c in children(p.pid) if b"virtiofsd" in Path(f"/proc/{c}/cmdline").read_bytes()]
    assert len(daemons) == 1, daemons
    started = time.monotonic()
    os.kill(daemons[0], signal.SIGKILL)
    code, _, err = finish(p)
    assert code == cli.EXIT_ERROR and time.monotonic() - started < 60, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "virtio-fs hostfs: virtiofsd ended" in lines[0] and "signal 9" in lines[0], err


def test_reboot_and_a_driver_reset_with_the_share_mounted(share: Path) -> None:
    """`reboot -f` resets the machine (the rings stop, the next boot sets them up again), and a
    driver unbound and bound again resets the device alone (status 0); the share works after each."""
    script = ("if [ -e /a/booted ]; then\n"
              "  echo SECOND-BOOT:$(cat /a/booted)\n"
              "  umount /a\n"
              "  dev=$(basename $(readlink /sys/bus/virtio/drivers/virtiofs/virtio*))\n"
              "  echo $dev > /sys/bus/virtio/drivers/virtiofs/unbind && echo $dev > /sys/bus/virtio/drivers/virtiofs/bind\n"
              "  mount -t virtiofs hostfs /a && echo AFTER-RESET:$(cat /a/hello.txt)\n"
              "else\n"
              "  echo first > /a/booted && sync && reboot -f\n"
              "fi\n")
    code, out, err = finish(pyvmm_run([f"{share},hostfs"], script, share))
    assert code == cli.EXIT_OK, out[-3000:] + err
    assert "SECOND-BOOT:first" in out and "AFTER-RESET:hello over virtio-fs" in out, out[-3000:]

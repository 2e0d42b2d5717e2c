"""Debian's arm64 kernel drives pyvmm's virtio-mmio devices: block, entropy, network, console.

The guest's /init loads the virtio modules when the device tree has virtio-mmio nodes and runs
the command given as pyvmm.run= (commas stand for spaces). Disk images are tar archives: the
guest's busybox reads and writes them as raw block devices, and the host reads them back with
tarfile, so no filesystem driver is needed on either side.
"""

from __future__ import annotations

import io
import os
import select
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from pyvmm import cli
from pyvmm.boot.load import boot
from pyvmm.devices.virtio import mmio_registers as reg
from pyvmm.devices.virtio.blk import VirtioBlk
from pyvmm.devices.virtio.net import VirtioNet, parse_network
from pyvmm.devices.virtio.rng import VirtioRng
from pyvmm.devices.virtio.transport import VirtioMmio
from pyvmm.machine.vm import Vm
from pyvmm.testing.payloads import Payloads
from tests.conftest import errors, linux_guest
from tests.kvm.conftest import guest

GUEST_TIMEOUT = 120.0


def tar_image(path: Path, files: dict[str, bytes], size: int = 1 << 20) -> None:
    """A raw disk image holding a tar archive of `files`, padded to `size`."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue().ljust(size, b"\0"))


def linux_vm(out: bytearray) -> Vm:
    """A VM for the Linux guest whose serial console output collects in `out`."""
    return Vm(cpus=1, mem_mib=256, console=out.append)


def run_linux(vm: Vm, out: bytearray, commands: str) -> str:
    """Boot the guest with `commands` (shell, spaces as commas) and return its console output."""
    image, initrd = linux_guest()
    boot(vm, kernel=str(image), initrd=str(initrd), cmdline=f"console=ttyS0 quiet pyvmm.run={commands}")
    result = vm.run(timeout=GUEST_TIMEOUT)
    text = out.decode(errors="replace")
    assert result.reason == "poweroff", f"{result}\n{text[-4000:]}"
    return text


def acks_reaching_pyvmm(transport: VirtioMmio) -> list[int]:
    """The InterruptACK values the guest writes that leave KVM for `transport` (wraps its write)."""
    acks: list[int] = []
    write = transport.write

    def seen(offset: int, size: int, value: int) -> None:
        if offset == reg.INTERRUPT_ACK:
            acks.append(value)
        write(offset, size, value)
    setattr(transport, "write", seen)  # noqa: B010 (the bus calls the instance's attribute)
    return acks


def test_block_read_write_flush_readonly_and_entropy(tmp_path: Path) -> None:
    source, scratch, readonly = tmp_path / "source.img", tmp_path / "scratch.img", tmp_path / "ro.img"
    tar_image(source, {"hello.txt": b"read-from-virtio-blk\n"})
    scratch.write_bytes(bytes(1 << 20))
    tar_image(readonly, {"keep.txt": b"unchanged\n"})
    before = readonly.read_bytes()
    commands = ";".join([
        "tar,-xf,/dev/vda,-C,/tmp", "echo,BLK-READ:$(cat,/tmp/hello.txt)",
        "echo,written-by-the-guest>/tmp/out.txt", "tar,-cf,/tmp/out.tar,-C,/tmp,out.txt",
        "dd,if=/tmp/out.tar,of=/dev/vdb,conv=fsync,2>/dev/null", "echo,BLK-WRITE-RC:$?",
        "echo,RO-FLAG:$(cat,/sys/block/vdc/ro)",
        "dd,if=/dev/zero,of=/dev/vdc,bs=512,count=1,conv=fsync,2>/dev/null", "echo,RO-WRITE-RC:$?",
        "echo,RNG-CURRENT:$(cat,/sys/class/misc/hw_random/rng_current)",
        "echo,RNG-BYTES:$(dd,if=/dev/hwrng,bs=32,count=1,2>/dev/null|od,-An,-tx1|tr,-d,'\\n')",
    ])
    out = bytearray()
    with linux_vm(out) as vm:
        blks = [VirtioBlk(str(source)), VirtioBlk(str(scratch)), VirtioBlk(str(readonly), read_only=True)]
        acks = [acks_reaching_pyvmm(vm.add_virtio(blk)) for blk in blks]
        rng = VirtioRng()
        acks.append(acks_reaching_pyvmm(vm.add_virtio(rng)))
        text = run_linux(vm, out, commands)
        flushes = blks[1].flushes
    # every request above completed on an interrupt, and Linux acknowledged each: the ACKs of used
    # buffers stayed in KVM (an ioeventfd), so none of the four devices saw one
    assert acks == [[], [], [], []]
    assert "BLK-READ:read-from-virtio-blk" in text, text[-3000:]
    assert "BLK-WRITE-RC:0" in text, text[-3000:]
    assert flushes >= 1  # conv=fsync reached pyvmm as VIRTIO_BLK_T_FLUSH
    with tarfile.open(scratch) as tar:  # the host reads the guest's file back
        member = tar.extractfile("out.txt")
        assert member is not None and member.read() == b"written-by-the-guest\n"
    assert "RO-FLAG:1" in text  # VIRTIO_BLK_F_RO made the disk read-only in the guest
    assert "RO-WRITE-RC:0" not in text and "RO-WRITE-RC:" in text
    assert readonly.read_bytes() == before
    assert "RNG-CURRENT:virtio_rng.0" in text, text[-3000:]
    random = next(line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("RNG-BYTES:"))
    assert len(random) == 32 and len(set(random)) > 8  # 32 bytes, not a constant
    assert rng.bytes_served >= 32


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def test_guest_pings_the_host_over_a_tap(tmp_path: Path) -> None:
    """Both ends set up here: pyvmm opens (creates) the tap, the host side gets an address."""
    tap = "pyvmmtap0"
    out = bytearray()
    with linux_vm(out) as vm:
        net = VirtioNet(parse_network(f"mode=tap,tapif={tap}"))
        vm.add_virtio(net)
        ip("addr", "add", "192.168.77.1/24", "dev", tap)
        ip("link", "set", tap, "up")
        text = run_linux(vm, out, ";".join([
            "ip,addr,add,192.168.77.2/24,dev,eth0", "ip,link,set,eth0,up",
            "ping,-c,3,-W,10,192.168.77.1", "echo,PING-RC:$?"]))
        tx, rx = net.tx_frames, net.rx_frames
    assert "PING-RC:0" in text, text[-3000:]
    assert "3 packets transmitted, 3 packets received" in text
    assert tx >= 3 and rx >= 3


def test_network_without_backend_comes_up(tmp_path: Path) -> None:
    out = bytearray()
    with linux_vm(out) as vm:
        net = VirtioNet(parse_network("mode=none,guest_mac=02:00:00:00:00:42"))
        vm.add_virtio(net)
        text = run_linux(vm, out, "ip,link,set,eth0,up;echo,MAC:$(cat,/sys/class/net/eth0/address);"
                            "echo,CARRIER:$(cat,/sys/class/net/eth0/carrier)")
    assert "MAC:02:00:00:00:00:42" in text and "CARRIER:1" in text, text[-3000:]


def test_console_over_virtio_both_ways() -> None:
    """`--console virtio`: the guest's console is hvc0; host stdin reaches it, its output comes back."""
    image, initrd = linux_guest()
    p = subprocess.run(
        [sys.executable, "-m", "pyvmm", "run", "-m", "256", "-k", str(image), "-i", str(initrd),
         "--console", "virtio", "-p", "quiet pyvmm.run=read,line;echo,VIRTIO-CONSOLE-GOT:$line",
         "--timeout", str(GUEST_TIMEOUT)],
        input="typed-on-the-host\n", capture_output=True, text=True, timeout=GUEST_TIMEOUT + 60,
        env={**os.environ})
    assert p.returncode == cli.EXIT_OK, p.stdout[-3000:] + p.stderr
    assert "VIRTIO-CONSOLE-GOT:typed-on-the-host" in p.stdout, p.stdout[-3000:]
    assert "PYVMM-GUEST: init reached" in p.stdout  # init's own output went through hvc0


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("-n", "mode=tap", "network 'mode=tap': mode=tap needs tapif=NAME"),
    ("-n", "mode=bridge", "network 'mode=bridge': mode must be tap or none"),
    ("-n", "tapif=", "network 'tapif=': mode=tap needs tapif=NAME"),
    ("-n", "mode=none,guest_mac=01:00:00:00:00:01",
     "network 'mode=none,guest_mac=01:00:00:00:00:01': 01:00:00:00:00:01 is a multicast address: a NIC needs a unicast one"),
    ("-d", "/nonexistent.img", "disk /nonexistent.img: No such file or directory"),
    ("-d", "/dev/null", "disk /dev/null is not a file or a block device"),
    ("-d", "x.img,rw", "disk 'x.img,rw': unknown option 'rw' (FILE[,ro][,nolock][,backend=python|qsd])"),
])
def test_bad_device_flags_are_one_line(flag: str, value: str, message: str) -> None:
    image, _ = linux_guest()
    p = subprocess.run([sys.executable, "-m", "pyvmm", "run", "-k", str(image), flag, value],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == cli.EXIT_ERROR
    assert errors(p.stderr) == [f"pyvmm: error: {message}"]


def locked_by_another(path: Path) -> bool:
    """Whether another open file holds a lock on `path` (a shared OFD lock of our own is refused)."""
    from pyvmm.devices.virtio.blk import lock_image
    from pyvmm.errors import VmmError

    fd = os.open(path, os.O_RDONLY)
    try:
        lock_image(fd, str(path), shared=True)
        return False
    except VmmError:
        return True
    finally:
        os.close(fd)


def test_a_second_pyvmm_on_the_same_image_is_refused(pyvmm_payloads: Payloads, tmp_path: Path) -> None:
    """The first VM holds its disk's lock while it runs; a second one on the same image gets one
    line and status 1, and takes it with ,nolock (or once the first has gone)."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    spin = str(pyvmm_payloads.build(guest("spin")))
    first = subprocess.Popen([sys.executable, "-m", "pyvmm", "run", "-f", spin, "-m", "16", "-d", str(disk),
                              "--timeout", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def second(*opts: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "pyvmm", "run", "-f", spin, "-m", "16", "-d",
                                   ",".join([str(disk), *opts]), "--timeout", "1"],
                                  capture_output=True, text=True, timeout=60)

        deadline = time.monotonic() + 40
        while not locked_by_another(disk):  # until the first has its disk open and locked
            assert time.monotonic() < deadline and first.poll() is None, first.communicate()
            time.sleep(0.2)
        p = second()
        assert p.returncode == cli.EXIT_ERROR
        assert errors(p.stderr) == [f"pyvmm: error: disk {disk} is locked: another process, or another -d "
                                         "of this one, uses it (add ,nolock to use it anyway)"]
        assert second("nolock").returncode == cli.EXIT_TIMEOUT  # it ran: the user opted out
    finally:
        first.kill()
        first.wait()
    assert second().returncode == cli.EXIT_TIMEOUT  # the lock went with the first process


def test_what_the_guest_flushed_survives_kill_9(tmp_path: Path) -> None:
    """The guest writes a block and syncs it (FLUSH: fsync on the host), says so, and goes on
    running; pyvmm is killed with SIGKILL; the image holds the block."""
    image, initrd = linux_guest()
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    marker = "flushed-before-the-kill"
    p = subprocess.Popen(
        [sys.executable, "-m", "pyvmm", "run", "-m", "256", "-k", str(image), "-i", str(initrd), "-d", str(disk),
         "-p", f"quiet pyvmm.run=echo,{marker}|dd,of=/dev/vda,conv=fsync,2>/dev/null;echo,SYNCED-$?;sleep,600",
         "--timeout", "300"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None
    seen, deadline = b"", time.monotonic() + 240
    try:
        while b"SYNCED-0" not in seen:
            assert time.monotonic() < deadline and p.poll() is None, seen[-2000:]
            if select.select([p.stdout], [], [], 1.0)[0]:
                seen += os.read(p.stdout.fileno(), 4096)
        p.kill()
        p.wait(30)
    finally:
        p.kill()
    assert disk.read_bytes()[:len(marker)] == marker.encode()


def test_run_9p_shares_a_host_directory_with_linux(tmp_path: Path) -> None:
    """`--9p DIR,TAG` (kvmtool's spelling): Linux mounts the tag, reads a host file, writes one
    back, lists the directory; a `,ro` share refuses the guest's writes."""
    image, initrd = linux_guest()
    rw, ro = tmp_path / "rw", tmp_path / "ro"
    rw.mkdir()
    ro.mkdir()
    (rw / "hello.txt").write_text("hello from the host\n")
    (ro / "keep.txt").write_text("keep\n")
    script = ("mkdir,/a,/b;mount,-t,9p,-o,trans=virtio,hostrw,/a;mount,-t,9p,-o,trans=virtio,hostro,/b;"
              "echo,READ:$(cat,/a/hello.txt);echo,written-by-linux>/a/new.txt;mkdir,/a/dir;"
              "echo,LIST:$(ls,/a);echo,x>/b/keep.txt;echo,RO-WRITE:$?;umount,/a;umount,/b")
    p = subprocess.run(
        [sys.executable, "-m", "pyvmm", "run", "-m", "256", "-k", str(image), "-i", str(initrd),
         "--9p", f"{rw},hostrw", "--9p", f"{ro},hostro,ro", "-p", f"quiet pyvmm.run={script}",
         "--timeout", str(GUEST_TIMEOUT)],
        capture_output=True, text=True, timeout=GUEST_TIMEOUT + 60)
    assert p.returncode == cli.EXIT_OK, p.stdout[-3000:] + p.stderr
    assert "READ:hello from the host" in p.stdout, p.stdout[-3000:]
    assert "LIST:dir hello.txt new.txt" in p.stdout, p.stdout[-3000:]
    assert (rw / "new.txt").read_text() == "written-by-linux\n" and (rw / "dir").is_dir()
    assert "RO-WRITE:1" in p.stdout and (ro / "keep.txt").read_text() == "keep\n"

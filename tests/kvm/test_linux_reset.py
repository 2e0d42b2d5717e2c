"""A Linux guest doing virtio-blk and virtio-net I/O is reset three times (`reboot -f`, PSCI
SYSTEM_RESET) within one run: every boot reaches init, finds its disk intact and its network
working, while the host keeps sending it frames across each reset."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import tarfile
from pathlib import Path

from pyvmm.boot.load import boot
from pyvmm.devices.virtio.blk import VirtioBlk
from pyvmm.devices.virtio.net import VirtioNet, parse_network
from pyvmm.machine.vm import Vm
from tests.conftest import linux_guest

TAP = "pyvmmtap1"
BOOTS = 4  # the first boot and three resets

# Run at every boot (extracted from /dev/vda): count the boot on /dev/vdb (which a reset leaves
# alone, as a disk), check the payload, talk to the host, and reset until the fourth boot.
BOOT_SCRIPT = f"""
n=$(dd if=/dev/vdb bs=512 count=1 2>/dev/null | tr -dc 0-9)
n=$(( ${{n:-0}} + 1 ))
printf '%s' "$n" | dd of=/dev/vdb bs=512 count=1 conv=sync,fsync 2>/dev/null
sum=$(md5sum /tmp/payload.bin | cut -d' ' -f1)
ip addr add 192.168.78.2/24 dev eth0
ip link set eth0 up
if ping -c 3 -W 5 192.168.78.1 >/dev/null; then net=ok; else net=failed; fi
echo "PYVMM-RESET-BOOT $n disk=$sum net=$net"
if [ "$n" -lt {BOOTS} ]; then reboot -f; fi
"""


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def test_linux_with_disk_and_network_io_survives_three_resets(tmp_path: Path) -> None:
    payload = os.urandom(256 << 10)
    disk, counter = tmp_path / "disk.img", tmp_path / "counter.img"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in (("boot.sh", BOOT_SCRIPT.encode()), ("payload.bin", payload)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    disk.write_bytes(buf.getvalue().ljust(1 << 20, b"\0"))
    before = disk.read_bytes()
    counter.write_bytes(bytes(64 << 10))
    image, initrd = linux_guest()
    out = bytearray()
    flood = None
    with Vm(cpus=2, mem_mib=256, console=out.append) as vm:
        vm.add_virtio(VirtioBlk(str(disk), read_only=True))
        vm.add_virtio(VirtioBlk(str(counter)))
        vm.add_virtio(VirtioNet(parse_network(f"mode=tap,tapif={TAP}")))
        ip("addr", "add", "192.168.78.1/24", "dev", TAP)
        ip("link", "set", TAP, "up")
        # frames for the guest all the time, so receives are in flight when it resets
        flood = subprocess.Popen(["ping", "-q", "-i", "0.05", "-w", "200", "192.168.78.2"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        boot(vm, kernel=str(image), initrd=str(initrd),
             cmdline="console=ttyS0 quiet pyvmm.run=tar,-xf,/dev/vda,-C,/tmp;sh,/tmp/boot.sh")
        try:
            result = vm.run(timeout=300)
        finally:
            flood.kill()
            flood.wait()
        resets = vm.resets
    text = out.decode(errors="replace")
    assert result.reason == "poweroff", f"{result}\n{text[-4000:]}"
    assert resets == BOOTS - 1
    md5 = hashlib.md5(payload).hexdigest()
    boots = [line.split() for line in text.splitlines() if line.startswith("PYVMM-RESET-BOOT")]
    assert boots == [["PYVMM-RESET-BOOT", str(n), f"disk={md5}", "net=ok"] for n in range(1, BOOTS + 1)], text[-4000:]
    assert text.count("PYVMM-GUEST: init reached") == BOOTS
    assert disk.read_bytes() == before
    assert counter.read_bytes()[:1] == str(BOOTS).encode()

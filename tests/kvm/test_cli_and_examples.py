"""The CLI and the shipped example against real KVM."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pyvmm import cli
from pyvmm.devices.virtio.blk import lock_image
from pyvmm.machine.host import probe
from pyvmm.testing.payloads import Payloads
from tests.conftest import ROOT, errors
from tests.kvm.conftest import NEEDS_FILTER, guest, needs_filter


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyvmm", *args], capture_output=True, text=True, timeout=120)


def test_run_to_poweroff_exits_zero(pyvmm_payloads: Payloads) -> None:
    p = run_cli("run", "-f", str(pyvmm_payloads.build(guest("mmio_unmapped"))), "-m", "16")
    assert p.returncode == cli.EXIT_OK, p.stderr


def test_run_timeout_stops_a_spinning_guest(pyvmm_payloads: Payloads) -> None:
    p = run_cli("run", "-f", str(pyvmm_payloads.build(guest("spin"))), "-c", "2", "-m", "16", "--timeout", "1")
    assert p.returncode == cli.EXIT_TIMEOUT
    assert errors(p.stderr) == ["pyvmm: guest ended: timeout: the guest was still running after 1 s"]


def test_empty_firmware_is_one_line(tmp_path: Path) -> None:
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    p = run_cli("run", "-f", str(empty))
    assert p.returncode == cli.EXIT_ERROR
    assert errors(p.stderr) == [f"pyvmm: error: firmware {empty} is empty"]


def test_a_missing_kernel_leaves_no_device_open(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The machine is built before the kernel is looked for (kvmtool's order); the disk made from
    -d is the VM's by then, and closed with it: its lock is gone when pyvmm returns."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    assert cli.main(["run", "-d", str(disk), "-k", str(tmp_path / "missing")]) == cli.EXIT_ERROR
    assert errors(capsys.readouterr().err) == [f"pyvmm: Fatal: Unable to open kernel {tmp_path / 'missing'}: "
                                               "it does not exist or is not a file"]
    fd = os.open(disk, os.O_RDWR)
    try:
        lock_image(fd, str(disk), shared=False)  # a disk left open would still hold its write lock
    finally:
        os.close(fd)


def test_firmware_too_big_for_ram_is_one_line(tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(b"\0" * (2 << 20))
    p = run_cli("run", "-f", str(big), "-m", "1")
    assert p.returncode == cli.EXIT_ERROR
    assert errors(p.stderr) == [
        "pyvmm: error: the firmware (2 MiB), initrd (0 MiB) and device tree do not fit in 1 MiB of RAM; "
        "give at least 6 MiB (-m)"]


def test_check_reports_the_host_shape() -> None:
    p = run_cli("check")
    assert p.returncode == cli.EXIT_OK, p.stderr
    shape = probe()
    for line in (f"SMCCC filter    {'supported' if shape.smccc_filter else 'missing'}", f"GIC             vGICv{shape.gic}",
                 f"page size       {shape.page_size >> 10} KiB", f"kernel          {os.uname().release}"):
        assert line in p.stdout.splitlines(), p.stdout
    assert ("can: service PSCI, SDEI and custom SMCCC services in Python" in p.stdout) == shape.smccc_filter
    assert ("can: give guests KVM's in-kernel PSCI (over HVC), as kvmtool does" in p.stdout) != shape.smccc_filter


@NEEDS_FILTER
def test_smccc_demo_example() -> None:
    p = subprocess.run([sys.executable, str(ROOT / "examples" / "smccc_demo.py")], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    for conduit in ("hvc", "smc"):
        assert f"[vcpu0 {conduit}] demo vendor service[0x1]() = 0x2a" in out
        assert f"[vcpu1 {conduit}] demo vendor service[0x1]() = 0x2a" in out
        assert f"[vcpu0 {conduit}] CPU_ON(target_cpu=0x1, entry_point_address=0x" in out
    assert "guest saw: DEMO_SWAP(0x1111, 0x2222, 0x3333)            -> 0x0, 0x3333, 0x2222, 0x1111" in out
    assert out.count("guest saw: DEMO_VERSION on the other conduit            -> 0xffffffffffffffff") == 2
    assert out.count("guest saw: CPU_ON(cpu1), AFFINITY_INFO(cpu1) once off   -> 0x0, 0x1") == 2
    assert out.count("guest ended: poweroff (vcpu0): PSCI SYSTEM_OFF") == 2


@needs_filter("the example shows pyvmm's PSCI and SDEI served in Python, traced")
def test_sdei_demo_example() -> None:
    p = subprocess.run([sys.executable, str(ROOT / "examples" / "sdei_demo.py")], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "[vcpu0 sdei] --- dispatch event 0 -> handler" in out
    assert "[vcpu0 sdei] --- dispatch event 100 -> handler" in out
    assert "guest saw: event 100 got through; powering off" in out
    assert "2 SDEI events delivered" in out


@NEEDS_FILTER
def test_run_with_a_service_module_trace_and_smc_conduit(pyvmm_payloads: Payloads) -> None:
    demo = pyvmm_payloads.build("examples/guests/smccc_demo.S", conduit="smc")
    p = run_cli("run", "-f", str(demo), "-c", "2", "-m", "16", "--psci-conduit", "smc",
                "--service", str(ROOT / "examples" / "vendor_service.py"), "--trace", "smccc", "--timeout", "60")
    assert p.returncode == cli.EXIT_OK, p.stderr
    assert "[vcpu0 smc] demo vendor service[0x1]() = 0x2a" in p.stderr
    assert "[vcpu0 smc] CPU_ON(target_cpu=0x1, entry_point_address=0x" in p.stderr
    assert "[vcpu0 smc] SYSTEM_OFF() = ? (does not return)" in p.stderr


@NEEDS_FILTER
def test_replace_psci_version_and_deny_a_range(pyvmm_payloads: Payloads, tmp_path: Path) -> None:
    mine = tmp_path / "my_psci_version.py"
    mine.write_text("RANGE = (0x84000000, 1)\nNAME = 'my PSCI_VERSION'\n\ndef handle(call):\n    return 0x20000\n")
    demo = pyvmm_payloads.build("examples/guests/smccc_demo.S")
    p = run_cli("run", "-f", str(demo), "-c", "2", "-m", "16", "--replace-service", str(mine),
                "--deny", "0xC6000000+0x100", "--trace", "smccc", "--timeout", "60")
    assert p.returncode == cli.EXIT_OK, p.stderr
    assert "my PSCI_VERSION[0x0]() = 0x20000" in p.stderr
    assert "demo vendor service" not in p.stderr  # denied by KVM: never forwarded
    assert "CPU_ON(" in p.stderr  # the rest of PSCI is still pyvmm's


@needs_filter("the example shows pyvmm's PSCI and SDEI served in Python, traced")
def test_boot_linux_example() -> None:
    p = subprocess.run([sys.executable, str(ROOT / "examples" / "boot_linux.py")], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr
    assert "[vcpu0 hvc] PSCI_VERSION() = 0x10001" in p.stdout
    assert "[vcpu0 hvc] CPU_ON(target_cpu=0x1, entry_point_address=0x" in p.stdout
    assert "PYVMM-GUEST: dmesg: " in p.stdout and "smp: Brought up 1 node, 2 CPUs" in p.stdout
    assert "PYVMM-GUEST: read from /dev/vda: hello from a virtio-blk disk" in p.stdout
    assert re.search(r"PYVMM-GUEST: from /dev/hwrng:( [0-9a-f]{2}){8}", p.stdout)
    assert "guest ended: poweroff (vcpu0): PSCI SYSTEM_OFF" in p.stdout


def test_exec_demo_example() -> None:
    p = subprocess.run([sys.executable, str(ROOT / "examples" / "exec_demo.py")], capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "guest: Linux" in p.stdout and "checksum matches the host's" in p.stdout
    assert "stderr: this goes to stderr" in p.stdout and "status: 3" in p.stdout

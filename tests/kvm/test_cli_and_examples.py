"""The CLI and the shipped example against real KVM."""

from __future__ import annotations

import subprocess
import sys

from pyvmm import cli
from tests.conftest import ROOT, guest_image


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyvmm", *args], capture_output=True, text=True, timeout=120)


def test_run_to_poweroff_exits_zero() -> None:
    p = run_cli("run", "-f", str(guest_image("mmio_unmapped")), "-m", "16")
    assert p.returncode == cli.EXIT_OK, p.stderr


def test_run_timeout_stops_a_spinning_guest() -> None:
    p = run_cli("run", "-f", str(guest_image("spin")), "-c", "2", "-m", "16", "--timeout", "1")
    assert p.returncode == cli.EXIT_TIMEOUT
    assert p.stderr.strip().splitlines() == ["pyvmm: guest ended: timeout: the guest was still running after 1 s"]


def test_empty_firmware_is_one_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    p = run_cli("run", "-f", str(empty))
    assert p.returncode == cli.EXIT_ERROR
    assert p.stderr.strip().splitlines() == [f"pyvmm: error: {empty} is empty"]


def test_firmware_too_big_for_ram_is_one_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    big = tmp_path / "big.bin"
    big.write_bytes(b"\0" * (2 << 20))
    p = run_cli("run", "-f", str(big), "-m", "1")
    assert p.returncode == cli.EXIT_ERROR
    assert "does not fit in guest RAM" in p.stderr and "Traceback" not in p.stderr


def test_check_reports_the_smccc_filter() -> None:
    p = run_cli("check")
    assert p.returncode == cli.EXIT_OK, p.stderr
    assert "SMCCC filter  supported" in p.stdout


def test_smccc_demo_example() -> None:
    p = subprocess.run([sys.executable, str(ROOT / "examples" / "smccc_demo.py")], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "guest saw   DEMO_ADD(40, 2) over HVC                     -> 0x2a" in p.stdout
    assert "DEMO_SWAP over SMC (four results)            -> 0x0, 0x3333, 0x2222, 0x1111" in p.stdout
    assert "unknown function 0xc6000042 over SMC         -> 0xffffffffffffffff" in p.stdout
    assert "guest ended: poweroff" in p.stdout

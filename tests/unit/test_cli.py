"""The CLI's bad-input paths: one line on stderr, a non-zero status, never a traceback."""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pyvmm import cli
from pyvmm.errors import KvmUnavailableError
from pyvmm.kvm.fds import Kvm
from pyvmm.machine.cpu_features import AS_THE_HOST_OFFERS, CpuOptions
from pyvmm.machine.gic import IRQCHIPS
from tests.conftest import ROOT


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyvmm", *args], capture_output=True, text=True, timeout=60)


def test_kvmtools_flags_as_its_users_spell_them() -> None:
    """kvm-unit-tests' runner's spelling (scripts/vmm.bash, arm/run) and kvmtool's CPU flags."""
    args = cli.build_parser().parse_args([
        "run", "--kernel", "t.flat", "--cpus", "2", "--params", "a b", "--nodefaults", "--network", "mode=none",
        "--loglevel=warning", "--mem", "256", "--pmu", "--irqchip=gicv3-its", "--initrd", "env",
        "--sve-max-vl", "256", "--disable-mte", "--no-pvtime", "--kaslr-seed", "0x10", "--virtio-transport", "mmio"])
    assert (args.kernel, args.cpus, args.params, args.nodefaults, args.network, args.loglevel, args.mem,
            args.irqchip, args.initrd, args.kaslr_seed) == (
        "t.flat", 2, "a b", True, ["mode=none"], "warning", 256, "gicv3-its", "env", 0x10)
    assert cli.cpu_options(args) == CpuOptions(sve_max_vl=256, pmu=True, mte=False, pvtime=False)
    assert args.virtio_transport == "mmio"
    defaults = cli.build_parser().parse_args(["run", "--kernel", "t.flat"])
    assert cli.cpu_options(defaults) == AS_THE_HOST_OFFERS and not defaults.nodefaults
    assert defaults.irqchip == "auto"
    for irqchip in IRQCHIPS:  # every one the GIC knows (the parser spells them out)
        assert cli.build_parser().parse_args(["run", "-k", "t", f"--irqchip={irqchip}"]).irqchip == irqchip


@pytest.mark.parametrize(("args", "message"), [
    (["run"], "one of the arguments -k/--kernel -f/--firmware is required"),
    (["run", "-k", "a", "-f", "b"], "not allowed with argument"),
    (["run", "-f", "x", "-c", "0"], "'0' must be at least 1"),
    (["run", "-f", "x", "-m", "lots"], "'lots' is not a size"),
    (["run", "-f", "x", "-m", "1536K"], "'1536K' is not a whole number of MiB"),
    (["run", "-f", "x", "--kaslr-seed", "0x10000000000000000"], "does not fit in 64 bits"),
    (["run", "-f", "x", "--timeout", "-3"], "must be positive"),
    (["run", "-f", "x", "--timeout", "inf"], "must be positive and at most 1e+08 (seconds)"),
    (["run", "-f", "x", "--bogus"], "unrecognized arguments: --bogus"),
    # options are spelled in full on every Python: argparse's abbreviations differ between them
    (["run", "-f", "x", "--time", "5"], "unrecognized arguments: --time 5"),
    (["frobnicate"], "invalid choice"),
    (["run", "-f", "x", "--irqchip=gicv4"], "argument --irqchip: invalid choice: 'gicv4'"),
    (["run", "-f", "x", "--sve-max-vl", "384"], "power of two from 128 to 2048 bits, not 384"),
    (["run", "-f", "x", "--sve-max-vl", "4096"], "power of two from 128 to 2048 bits, not 4096"),
    (["run", "-f", "x", "--loglevel=loud"], "argument --loglevel: invalid choice: 'loud'"),
    (["run", "-f", "x", "--virtio-transport", "pci"],
     "pyvmm's virtio devices are on virtio-mmio (version 2) only: give mmio, not pci"),
    (["run", "-f", "x", "--virtio-transport", "mmio-legacy"], "only: give mmio, not mmio-legacy"),
    (["run", "-f", "x", "--virtio-transport", "usb"], "'usb' is not one of kvmtool's transports"),
])
def test_bad_flags_are_one_line_usage_errors(args: list[str], message: str) -> None:
    p = run_cli(*args)
    assert p.returncode == cli.EXIT_USAGE
    assert message in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert "Traceback" not in p.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--gdb-wait"], "--gdb-wait waits for GDB: add --gdb tcp:[HOST:]PORT or --gdb unix:PATH"),
    (["--gdb", "1234"], "--gdb 1234: give tcp:[HOST:]PORT or unix:PATH"),
    (["--gdb", "tcp:localhost:65536"], "--gdb tcp:localhost:65536: give tcp:[HOST:]PORT or unix:PATH"),
    (["--gdb", "unix:/nonexistent-dir/gdb.sock"], "--gdb /nonexistent-dir/gdb.sock: there is no directory /nonexistent-dir"),
])
def test_bad_gdb_options_are_one_line_before_any_vm(tmp_path: Path, args: list[str], message: str) -> None:
    firmware = tmp_path / "fw.bin"
    firmware.write_bytes(b"\0" * 4)
    p = run_cli("run", "-f", str(firmware), *args)
    assert p.returncode == cli.EXIT_ERROR
    assert p.stderr.strip().splitlines() == [f"pyvmm: error: {message}"]
    assert len(p.stderr.strip().splitlines()) == 1


def test_missing_kvm_device_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(KvmUnavailableError, match="does not exist: this host has no KVM"):
        Kvm(str(tmp_path / "kvm"))
    with pytest.raises(KvmUnavailableError, match="cannot open"):
        Kvm("/dev/null/kvm")


def test_non_arm64_host_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    fw = tmp_path / "fw.bin"
    fw.write_bytes(b"\x00\x00\x00\x14")
    monkeypatch.setattr("pyvmm.machine.vm.os.uname", lambda: os.uname_result(("Linux", "h", "6", "1", "x86_64")))
    assert cli.main(["run", "-f", str(fw)]) == cli.EXIT_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["pyvmm: error: pyvmm needs an arm64 host's KVM, this host is x86_64 "
                   "(`make demo` and `make test` run pyvmm inside an emulated arm64 host)"]


def test_service_module_errors_are_one_line(tmp_path: Path) -> None:
    from pyvmm.errors import VmmError
    from pyvmm.services.modules import load_service_module, parse_range

    bad = tmp_path / "bad.py"
    bad.write_text("RANGE = 5\n")
    with pytest.raises(VmmError, match=r"must define RANGE = \(first function ID, count\)"):
        load_service_module(str(bad))
    bad.write_text("RANGE = (0xC6000000, 1)\n")
    with pytest.raises(VmmError, match=r"must define handle\(call\)"):
        load_service_module(str(bad))
    bad.write_text("import nonexistent_module_xyz\n")
    with pytest.raises(VmmError, match="failed to load: ModuleNotFoundError"):
        load_service_module(str(bad))
    m = load_service_module(str(ROOT / "examples" / "vendor_service.py"))
    assert (m.base, m.size, m.name) == (0xC600_0000, 0x100, "demo vendor service")
    assert parse_range("0xC3000000+0x100") == (0xC300_0000, 0x100)
    assert parse_range("0xC3000000-0xC30000FF") == (0xC300_0000, 0x100)
    with pytest.raises(VmmError, match="not a range of 32-bit"):
        parse_range("0xFFFFFFFF+2")
    with pytest.raises(VmmError, match="not a function-ID range"):
        parse_range("psci")


def test_bad_conduit_is_a_usage_error() -> None:
    p = run_cli("run", "-f", "x", "--psci-conduit", "svc")
    assert p.returncode == cli.EXIT_USAGE and "invalid choice: 'svc'" in p.stderr


def test_version() -> None:
    p = run_cli("--version")
    assert (p.returncode, p.stdout.strip()) == (0, "pyvmm 0.1.0")


def test_check_off_arm64_says_the_host_is_not_arm64(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("pyvmm.cli.cmd_check.os.uname", lambda: os.uname_result(("Linux", "h", "6.18.0", "1", "x86_64")))
    assert cli.main(["check"]) == cli.EXIT_ERROR
    out = capsys.readouterr().out
    assert "this host is x86_64" in out and "`make demo`" in out
    assert "SMCCC filter" not in out and "6.4" not in out  # not a kernel-version complaint


def test_virtio_devices_bring_their_own_options() -> None:
    """Each device type in CLI_DEVICES adds its options to `pyvmm run`, in kvmtool's order."""
    from pyvmm.devices.virtio.console import VirtioConsole
    from pyvmm.devices.virtio.fs import VirtioFs
    from pyvmm.devices.virtio.p9 import Virtio9p
    from pyvmm.devices.virtio.registry import CLI_DEVICES
    from pyvmm.devices.virtio.rng import VirtioRng
    from pyvmm.devices.virtio.vhost_net import VhostNet
    from pyvmm.devices.virtio.vhost_user_blk import VhostUserBlk
    from pyvmm.devices.virtio.vsock import VhostVsock

    assert CLI_DEVICES == (VhostUserBlk, VirtioConsole, VirtioRng, VhostNet, Virtio9p, VirtioFs, VhostVsock)
    help_text = run_cli("run", "--help").stdout
    for flag in ("--disk", "--console", "--rng", "--network", "--9p", "--fs", "--vsock"):
        assert flag in help_text


def test_sdei_for_an_aarch32_guest_is_one_line(tmp_path: Path) -> None:
    guest = tmp_path / "guest.bin"
    guest.write_bytes(b"\x00" * 16)
    p = run_cli("run", "--aarch32", "--sdei", "-f", str(guest))
    assert p.returncode == cli.EXIT_ERROR and "SDEI's calls are all SMC64" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_disks_that_cannot_be_one_are_refused_before_kvm_is_touched(tmp_path: Path) -> None:
    """Device flags are checked first (as kvmtool parses every option first), on any host."""
    small = tmp_path / "small.img"
    small.write_bytes(bytes(100))
    guest = tmp_path / "guest.bin"
    guest.write_bytes(bytes(16))
    for spec, message in ((str(small), f"disk {small} is smaller than one 512-byte sector"),
                          ("/dev/null", "disk /dev/null is not a file or a block device"),
                          ("/proc/self/status,ro", "disk /proc/self/status: cannot tell its size: Invalid argument"),
                          (str(tmp_path), f"disk {tmp_path}: Is a directory")):
        p = run_cli("run", "-f", str(guest), "-d", spec)
        assert (p.returncode, p.stderr.splitlines()) == (cli.EXIT_ERROR, [f"pyvmm: error: {message}"])


def test_a_control_socket_path_that_cannot_be_is_refused_before_kvm_is_touched(tmp_path: Path) -> None:
    guest = tmp_path / "guest.bin"
    guest.write_bytes(bytes(16))
    p = run_cli("run", "-f", str(guest), "--control", str(guest / "vm.sock"))
    assert (p.returncode, p.stderr.splitlines()) == (
        cli.EXIT_ERROR, [f"pyvmm: error: --control {guest / 'vm.sock'}: Not a directory"])


def test_help_names_the_commands_as_kvmtool_does() -> None:
    # kvm-unit-tests' runner takes a binary for a kvmtool when this is on its --help's stdout
    p = run_cli("--help")
    assert p.returncode == 0 and "The most commonly used pyvmm commands are:" in p.stdout


@pytest.mark.parametrize("columns", [None, "50", "200", "junk", "0"])
def test_the_help_is_as_wide_as_argparse_makes_it(monkeypatch: pytest.MonkeyPatch, columns: str | None) -> None:
    """The parsers give argparse's formatter the width it would ask shutil for (shutil, and the
    bz2 and lzma it loads, are left out of the run): the help reads the same."""
    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", columns)
    parser = cli.build_parser()
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for p in (parser, subcommands.choices["run"], subcommands.choices["exec"]):
        ours = p.format_help()
        assert isinstance(p.formatter_class, functools.partial)
        p.formatter_class = p.formatter_class.func  # argparse's formatter, finding the width itself
        assert p.format_help() == ours


@pytest.mark.parametrize(("text", "mib"), [("256", 256), ("256M", 256), ("256m", 256), ("2G", 2048),
                                           ("1t", 1 << 20), ("268435456B", 256), ("1048576k", 1024)])
def test_mem_takes_kvmtools_units(text: str, mib: int) -> None:
    assert cli.mem_mib(text) == mib

"""An unmodified Debian arm64 kernel boots under pyvmm, with PSCI serviced in Python."""

from __future__ import annotations

import gzip
import io
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pyfdt.pyfdt import FdtBlobParse

from pyvmm import cli
from pyvmm.machine.host import probe
from pyvmm.testing.payloads import Payloads
from tests.conftest import errors, linux_guest
from tests.kvm.conftest import guest, needs_filter

# before Linux 6.4 KVM answers every SMC NOT_SUPPORTED itself (arch/arm64/kvm/handle_exit.c, handle_smc)
SMC_NEEDS_FILTER = needs_filter("the SMC conduit reaches PSCI only through the filter's forwarding")


def pyvmm(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyvmm", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("conduit", ["hvc", pytest.param("smc", marks=SMC_NEEDS_FILTER)])
def test_linux_boots_to_init_and_powers_off(conduit: str) -> None:
    image, initrd = linux_guest()
    p = pyvmm("run", "-c", "2", "-m", "256", "-k", str(image), "-i", str(initrd), "-p", "quiet",
              "--psci-conduit", conduit, "--timeout", "240")
    assert p.returncode == cli.EXIT_OK, p.stdout[-3000:] + p.stderr
    out = p.stdout
    # pyvmm's PSCI_VERSION and CPU_ON (KVM's, which is also 1.1 since Linux 5.18, without the filter)
    assert "psci: PSCIv1.1 detected in firmware." in out
    assert "smp: Brought up 1 node, 2 CPUs" in out
    assert "PYVMM-GUEST: init reached after" in out
    assert "PYVMM-GUEST: powering off" in out  # and PSCI SYSTEM_OFF ended the run with status 0


@needs_filter("it tests pyvmm's SDEI, served in Python")
@pytest.mark.parametrize("conduit", ["hvc", "smc"])
def test_linux_finds_sdei_and_unmasks_every_cpu(conduit: str) -> None:
    """With --sdei the DT carries /firmware/sdei; Linux's driver probes pyvmm's SDEI 1.1, resets
    it on every CPU and unmasks every CPU as it comes online (drivers/firmware/arm_sdei.c)."""
    image, initrd = linux_guest()
    p = pyvmm("run", "-c", "2", "-m", "256", "-k", str(image), "-i", str(initrd), "-p", "quiet",
              "--psci-conduit", conduit, "--sdei", "--trace", "smccc", "--timeout", "240")
    assert p.returncode == cli.EXIT_OK, p.stdout[-3000:] + p.stderr[-3000:]
    assert "sdei: SDEIv1.1 (0x0) detected in firmware." in p.stdout
    assert "sdei: " in p.stdout and "failed" not in "".join(line for line in p.stdout.splitlines() if "sdei" in line)
    assert "PYVMM-GUEST: init reached after" in p.stdout
    calls = [line.split("] ", 1) for line in p.stderr.splitlines() if "SDEI_" in line]
    seen = {(who, call.split("  <")[0]) for who, call in calls}
    for cpu in (0, 1):
        assert (f"[vcpu{cpu} {conduit}", "SDEI_PRIVATE_RESET() = 0x0 SUCCESS") in seen
        assert (f"[vcpu{cpu} {conduit}", "SDEI_PE_UNMASK() = 0x0 SUCCESS") in seen
    assert any(call.startswith("SDEI_SHARED_RESET() = 0x0 SUCCESS") for _, call in calls)
    assert not any("NOT_SUPPORTED" in call or "DENIED" in call for _, call in calls)


def test_dump_dtb_writes_the_tree(tmp_path: Path) -> None:
    image, initrd = linux_guest()
    out = tmp_path / "guest.dtb"
    shape = probe()
    conduit = "smc" if shape.smccc_filter else "hvc"  # KVM before 6.4 answers no SMC
    p = pyvmm("run", "-c", "3", "-m", "128", "-k", str(image), "-i", str(initrd), "-p", "quiet",
              "--psci-conduit", conduit, "--dump-dtb", str(out), timeout=120)
    assert p.returncode == cli.EXIT_OK, p.stderr
    dts = FdtBlobParse(io.BytesIO(out.read_bytes())).to_fdt().to_dts()
    assert dts.count('enable-method = "psci";') == 3
    assert f'method = "{conduit}";' in dts and 'bootargs = "console=ttyS0 quiet";' in dts
    assert "linux,initrd-start" in dts
    assert ('"arm,gic-v3"' if shape.gic == 3 else '"arm,cortex-a15-gic"') in dts  # the vGIC the host gives
    assert "sdei" not in dts  # only with --sdei
    if shape.smccc_filter:  # (without it --sdei is refused: tests/kvm/test_host_shapes.py)
        p = pyvmm("run", "-m", "128", "-k", str(image), "--sdei", "--dump-dtb", str(out), timeout=120)
        dts = FdtBlobParse(io.BytesIO(out.read_bytes())).to_fdt().to_dts()
        assert 'compatible = "arm,sdei-1.0";' in dts and dts.count('method = "hvc";') == 2


def test_bad_or_missing_kernel_is_one_line(tmp_path: Path) -> None:
    compressed = tmp_path / "vmlinuz"
    compressed.write_bytes(b"\x1f\x8b\x08" + bytes(200))
    p = pyvmm("run", "-k", str(compressed), timeout=60)
    assert p.returncode == cli.EXIT_ERROR
    line, = errors(p.stderr)
    assert line.startswith("pyvmm: error: vmlinuz: its gzip data is corrupt")
    p = pyvmm("run", "-k", str(tmp_path / "nope"), timeout=60)
    # in kvmtool's words, which kvm-unit-tests' runner looks for (pyvmm.errors.KernelOpenError)
    assert errors(p.stderr) == [f"pyvmm: Fatal: Unable to open kernel {tmp_path / 'nope'}: "
                                "it does not exist or is not a file"]
    assert p.returncode == cli.EXIT_ERROR
    for option in ("-f", "-i"):
        p = pyvmm("run", *(["-k", str(linux_guest()[0])] if option == "-i" else []), option, str(tmp_path / "nope"),
                  timeout=60)
        what = "firmware" if option == "-f" else "initrd"
        assert errors(p.stderr) == [f"pyvmm: error: {what} {tmp_path / 'nope'} does not exist or is not a file"]
    image, initrd = linux_guest()
    p = pyvmm("run", "-k", str(image), "-i", str(initrd), "-m", "32", timeout=60)
    assert p.returncode == cli.EXIT_ERROR and "do not fit in 32 MiB of RAM" in p.stderr


def test_a_gzip_compressed_debian_kernel_boots(tmp_path: Path) -> None:
    """Ubuntu ships its arm64 kernel as a gzip-compressed Image: pyvmm unpacks it, as QEMU does."""
    image, initrd = linux_guest()
    vmlinuz = tmp_path / "vmlinuz"
    with open(image, "rb") as src, gzip.open(vmlinuz, "wb", compresslevel=1) as dst:
        shutil.copyfileobj(src, dst)
    p = pyvmm("run", "-m", "256", "-k", str(vmlinuz), "-i", str(initrd), "-p", "quiet", "--timeout", "240")
    assert p.returncode == cli.EXIT_OK, p.stdout[-3000:] + p.stderr
    assert "PYVMM-GUEST: init reached after" in p.stdout


def test_a_kernel_without_an_image_header_runs_as_under_kvmtool(pyvmm_payloads: Payloads) -> None:
    """kvmtool's command line for a flat binary (kvm-unit-tests' .flat): `-k` with no Image header
    loads it at RAM + 0x80000, with a note. This guest resets itself twice, then powers off."""
    kernel = pyvmm_payloads.build(guest("psci_reset"))
    p = pyvmm("run", "-k", str(kernel), "-m", "16", "--timeout", "60", timeout=120)
    assert p.returncode == cli.EXIT_OK, p.stderr
    assert errors(p.stderr) == [
        f"pyvmm: kernel {kernel} has no arm64 Image header: loaded as a flat binary at "
        "RAM + 0x80000, as kvmtool does"]


def test_terminal_input_reaches_the_guest_shell() -> None:
    """On a terminal, keystrokes go to the guest through the UART's receive interrupt: the guest
    runs a shell on its console (pyvmm.run=sh), which computes something and exits."""
    import os
    import pty
    import select
    import time

    image, initrd = linux_guest()
    pid, fd = pty.fork()
    if pid == 0:  # child: pyvmm with the pty as its terminal
        os.execv(sys.executable, [sys.executable, "-m", "pyvmm", "run", "-c", "1", "-m", "256", "-k", str(image),
                                  "-i", str(initrd), "-p", "quiet pyvmm.run=sh", "--timeout", "200"])
    out, sent, deadline = b"", False, time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            if select.select([fd], [], [], 0.5)[0]:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:
                    break  # pyvmm exited: the pty is closed
                if not chunk:
                    break
                out += chunk
            if not sent and b"init reached" in out:
                time.sleep(1.0)  # let the shell start reading the console
                os.write(fd, b"echo answer=$((6*7))\r")
                time.sleep(0.5)
                os.write(fd, b"exit\r")
                sent = True
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    assert b"answer=42" in out, out[-2000:]
    assert b"PYVMM-GUEST: powering off" in out
    assert os.waitstatus_to_exitcode(status) == cli.EXIT_OK

"""pyvmm as kvm-unit-tests' runner drives a kvmtool (its scripts/arch-run.bash, runtime.bash,
vmm.bash and arm/run): it finds the binary by its --help, probes each test's command line with a
kernel that does not exist, then runs it as `run --kernel F --cpus N --params ARGS --nodefaults
--network mode=none --loglevel=warning [--mem M] --initrd ENVFILE` and reads the guest's output;
and the other kvmtool options its users' scripts pass."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

from pyfdt.pyfdt import FdtBlobParse

from pyvmm import cli
from pyvmm.testing.payloads import Payloads
from tests.conftest import errors, host_shape, linux_guest
from tests.kvm.conftest import guest

# what the runner passes every test (scripts/vmm.bash, KVMTOOL_DEFAULT_OPTS)
KUT_DEFAULTS = ["--nodefaults", "--network", "mode=none", "--loglevel=warning"]
PROBE_KERNEL = "_NO_FILE_4Uhere_"  # scripts/runtime.bash, premature_failure


def pyvmm(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyvmm", *args], capture_output=True, text=True, timeout=timeout)


def env_file(tmp_path: Path) -> Path:
    """The runner's --initrd: KEY=VALUE lines, not a cpio (scripts/arch-run.bash, initrd_create)."""
    env = tmp_path / "env"
    env.write_text("TARGET=kvmtool\nKERNEL_VERSION=6\nKERNEL_PATCHLEVEL=12\nERRATA_FORCE=y\n")
    return env


def chosen(dtb: Path) -> str:
    dts: str = FdtBlobParse(io.BytesIO(dtb.read_bytes())).to_fdt().to_dts()
    return dts[dts.index("chosen {"):]


def test_the_runner_finds_pyvmm_and_its_probe_passes(tmp_path: Path) -> None:
    p = pyvmm("--help", timeout=60)
    assert "The most commonly used" in p.stdout  # search_kvmtool_binary
    gic = f"--irqchip=gicv{host_shape().gic}"
    for extra in ([], ["--mem", "256"], ["--mem", "256", "--pmu"], [gic]):
        p = probe(tmp_path, *extra)
        # every option accepted, the machine built, then the kernel cannot be opened: the test runs
        assert f"Fatal: Unable to open kernel {PROBE_KERNEL}" in p.stdout + p.stderr, (extra, p.stderr)
        assert p.returncode == cli.EXIT_ERROR and len(errors(p.stderr)) == 1
    # the other GIC: built if the host has it too, else the probe fails with its own one line
    # (the runner then skips the test and shows that line)
    other = "--irqchip=gicv2" if host_shape().gic == 3 else "--irqchip=gicv3"
    p = probe(tmp_path, other)
    assert p.returncode == cli.EXIT_ERROR and len(errors(p.stderr)) == 1, p.stderr
    assert errors(p.stderr)[0].startswith(f"pyvmm: error: {other}: this host's KVM offers no") or (
        f"Unable to open kernel {PROBE_KERNEL}" in p.stderr), p.stderr


def probe(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """The runner's premature_failure check (scripts/runtime.bash): the test's command line with a
    kernel that does not exist."""
    return pyvmm("run", "--kernel", PROBE_KERNEL, "--cpus", "2", "--params", "setup smp=2 mem=256", *KUT_DEFAULTS,
                 *extra, "--initrd", str(env_file(tmp_path)), timeout=60)


def test_defaults_are_added_only_to_a_linux_kernel_and_only_without_nodefaults(pyvmm_payloads: Payloads,
                                                                              tmp_path: Path) -> None:
    image, _ = linux_guest()
    flat = pyvmm_payloads.build(guest("smccc_roundtrip"))  # no Image header: a test binary, as kvm-unit-tests' are
    out = tmp_path / "guest.dtb"
    for kernel, options, bootargs in ((image, [], "console=ttyS0 a b"), (image, ["--nodefaults"], "a b"),
                                      (flat, [], "a b"), (image, ["-p", "console=hvc0 a"], "console=hvc0 a")):
        p = pyvmm("run", "--kernel", str(kernel), "--params", "a b", *options, "--dump-dtb", str(out), timeout=60)
        assert p.returncode == cli.EXIT_OK, p.stderr
        assert f'bootargs = "{bootargs}";' in chosen(out), (kernel.name, options)


def test_kaslr_seed_mem_units_and_no_network(pyvmm_payloads: Payloads, tmp_path: Path) -> None:
    out = tmp_path / "guest.dtb"
    flat = pyvmm_payloads.build(guest("smccc_roundtrip"))
    p = pyvmm("run", "-f", str(flat), "--kaslr-seed", "0x123456789abcdef0", "--mem", "1G",
              "--network", "mode=none", "--dump-dtb", str(out), timeout=60)
    assert p.returncode == cli.EXIT_OK, p.stderr
    assert "kaslr-seed = <0x12345678 0x9abcdef0>;" in chosen(out)
    dts = FdtBlobParse(io.BytesIO(out.read_bytes())).to_fdt().to_dts()
    assert "reg = <0x00000000 0x80000000 0x00000000 0x40000000>;" in dts  # 1 GiB of RAM at 2 GiB
    assert "virtio" not in dts  # mode=none: no NIC, as in kvmtool
    assert ("msi-controller@" in dts) == host_shape().its  # --irqchip auto: an ITS where KVM has one


def test_nodefaults_and_the_its_in_one_linux_boot(tmp_path: Path) -> None:
    """The runner's own options: the guest's command line is exactly --params (no console=: Linux
    writes to the UART the DT's stdout-path names). With --irqchip=gicv3-its, Linux's ITS driver
    finds the ITS where the DT says, maps its collections with commands through the ITS's command
    queue at boot (MAPC, SYNC) and waits for KVM to process them: a command KVM did not take
    would be "ITS queue timeout". A host without an ITS says so in one line instead."""
    image, initrd = linux_guest()
    its_flags: list[str] = []
    if host_shape().gic != 3 or not host_shape().its:
        p = pyvmm("run", "--kernel", str(image), "--irqchip=gicv3-its", timeout=60)
        assert p.returncode == cli.EXIT_ERROR and errors(p.stderr)[0].startswith("pyvmm: error: --irqchip=gicv3-its")
    else:
        its_flags = ["--irqchip=gicv3-its"]
        out = tmp_path / "guest.dtb"
        p = pyvmm("run", "--kernel", str(image), *its_flags, "--cpus", "2", "--dump-dtb", str(out), timeout=60)
        assert p.returncode == cli.EXIT_OK, p.stderr
        dts = FdtBlobParse(io.BytesIO(out.read_bytes())).to_fdt().to_dts()
        its = int(dts.split("msi-controller@")[1].split(" ")[0], 16)
        assert 'compatible = "arm,gic-v3-its";' in dts
    params = "pyvmm.run=cat,/proc/cmdline;dmesg|grep,-i,-e,its,-e,lpi"  # init prints its command line as it got it
    # --virtio-transport mmio: what a comparison with kvmtool (whose default is PCI) passes to both
    p = pyvmm("run", "--kernel", str(image), "--cpus", "2", "--params", params, *KUT_DEFAULTS, "--mem", "256",
              *its_flags, "--initrd", str(initrd), "--virtio-transport", "mmio", "--timeout", "240")
    assert p.returncode == cli.EXIT_OK, p.stdout[-2000:] + p.stderr
    assert params in p.stdout.replace("\r", "").splitlines(), p.stdout[-2000:]
    if its_flags:
        assert f"ITS [mem {its:#010x}-{its + 0x1_ffff:#010x}]" in p.stdout, p.stdout[-3000:]
        assert "LPI" in p.stdout and "queue timeout" not in p.stdout

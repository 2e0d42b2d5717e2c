"""pyvmm on each host shape (pyvmm/machine/host.py). KVM's in-kernel PSCI, which is what a kernel
without the SMCCC filter (Linux < 6.4) gives every guest, runs Linux on every shape; there,
what needs the filter is refused in one line, and the Python API says so too."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pyvmm import cli
from pyvmm.boot.load import boot
from pyvmm.devices.virtio.blk import VirtioBlk
from pyvmm.errors import SmcccFilterUnavailableError
from pyvmm.machine.host import probe
from pyvmm.machine.vm import Vm
from tests.conftest import linux_guest
from tests.kvm.test_linux_boot import pyvmm

NO_FILTER = pytest.mark.host(smccc_filter=False, reason="shows what a kernel without the SMCCC filter refuses")


def kernel_version() -> tuple[int, int]:
    major, minor = os.uname().release.split(".")[:2]
    return int(major), int(minor)


def test_the_capability_query_matches_the_kernel() -> None:
    with Vm() as vm:
        assert vm.has_smccc_filter == probe().smccc_filter == (kernel_version() >= (6, 4))
        assert (vm.psci is not None) == vm.has_smccc_filter  # pyvmm's own PSCI wherever it can be had


def test_linux_boots_and_resets_with_kvms_psci_two_vcpus_and_a_disk(tmp_path: Path) -> None:
    """Vm(psci=False): KVM answers PSCI (CPU_ON brings up the secondary inside KVM_RUN, where it
    waited from the start) and its SYSTEM_RESET restarts the guest within the run."""
    marker = os.urandom(8).hex()
    disk = tmp_path / "disk.img"
    disk.write_bytes(marker.encode().ljust(1 << 20, b"\0"))
    image, initrd = linux_guest()
    out = bytearray()
    vm = Vm(cpus=2, mem_mib=256, psci=False, console=lambda byte: seen(byte))

    def seen(byte: int) -> None:
        out.append(byte)
        if byte == 10 and out.count(b"DISK:") == 2:
            vm.stop("the second boot read the disk")

    with vm:
        vm.add_virtio(VirtioBlk(str(disk), read_only=True))
        boot(vm, kernel=str(image), initrd=str(initrd),
             cmdline="console=ttyS0 quiet pyvmm.run=echo,DISK:$(head,-c,16,/dev/vda);reboot,-f")
        result = vm.run(400)
        assert result.reason == "stopped", result
        assert vm.resets == 1  # KVM_SYSTEM_EVENT_RESET: a reset within the run
        assert vm.smccc.calls == 0  # KVM answered every SMCCC call itself
    text = out.decode(errors="replace")
    assert text.count("smp: Brought up 1 node, 2 CPUs") == 2, text[-3000:]
    assert text.count(f"DISK:{marker}") == 2


@NO_FILTER
def test_without_the_filter_linux_runs_with_kvms_psci_and_what_needs_it_is_one_line(tmp_path: Path) -> None:
    image, initrd = linux_guest()
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"PYVMM-DISK-OK".ljust(1 << 20, b"\0"))
    p = pyvmm("run", "-c", "2", "-m", "256", "-k", str(image), "-i", str(initrd), "-d", f"{disk},ro",
              "-p", "quiet pyvmm.run=head,-c,13,/dev/vda;echo", "--timeout", "240")
    assert p.returncode == cli.EXIT_OK, p.stdout[-3000:] + p.stderr
    assert "smp: Brought up 1 node, 2 CPUs" in p.stdout and "PYVMM-DISK-OK" in p.stdout
    assert p.stderr.count("has no SMCCC filter: guests run with KVM's in-kernel PSCI") == 1, p.stderr
    p = pyvmm("exec", "-c", "2", "--", "sh", "-c", "nproc; echo to-stderr >&2")
    assert (p.returncode, p.stdout, p.stderr) == (0, "2\n", "to-stderr\n")  # exec's streams are the command's
    service = tmp_path / "svc.py"
    service.write_text("RANGE = (0xC2000000, 16)\n\ndef handle(call):\n    return 0\n")
    for option, args in (("--sdei", ["--sdei"]), ("--service", ["--service", str(service)]),
                         ("--trace smccc", ["--trace", "smccc"]), ("the SMC conduit (--psci-conduit smc)", ["--psci-conduit", "smc"])):
        p = pyvmm("run", "-k", str(image), *args, timeout=60)
        assert p.returncode != cli.EXIT_OK and p.stdout == ""
        line, = p.stderr.splitlines()  # the refusal alone: the note comes only with a guest that runs
        assert line.startswith(f"pyvmm: error: {option} needs KVM's SMCCC filter, which Linux >= 6.4 has; "
                               f"this host runs {os.uname().release}"), p.stderr


@NO_FILTER
def test_without_the_filter_the_python_api_raises_a_clear_exception() -> None:
    with pytest.raises(SmcccFilterUnavailableError, match=r"^pyvmm's own PSCI \(Vm\(psci=True\)\) needs KVM's SMCCC "
                       r"filter, which Linux >= 6\.4 has"):
        Vm(psci=True)
    with Vm(cpus=2) as vm:
        assert not vm.has_smccc_filter and vm.psci is None
        with pytest.raises(SmcccFilterUnavailableError, match="^SDEI needs KVM's SMCCC filter"):
            vm.enable_sdei()
        with pytest.raises(SmcccFilterUnavailableError, match="^the SMCCC service mine needs"):
            vm.smccc.register(0xC200_0000, 16, lambda call: 0, "mine")

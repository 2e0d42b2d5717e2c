"""The machine's life cycle on real KVM: construction that fails part-way, requests queued while
a vCPU is stopped, a reset that returns the vGIC to its initial state, and threads that will
not stop (pyvmm/machine/lifecycle.py)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import resource
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pyvmm import cli
from pyvmm.errors import VmmError
from pyvmm.machine.gic import Gic
from pyvmm.machine.host import probe
from pyvmm.machine.lifecycle import STOP_GRACE
from pyvmm.machine.memory import GuestMemory, Region
from pyvmm.machine.vcpu import Vcpu
from pyvmm.machine.vm import RAM_BASE, Vm
from pyvmm.smccc.call import SmcccCall
from pyvmm.smccc.service import Service
from pyvmm.testing.payloads import MakePayloadVm, Payloads
from tests.conftest import errors, linux_guest
from tests.kvm.conftest import NEEDS_FILTER, guest

SIP64 = 0xC200_0000


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def mapped_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmSize:"))


def address_space_limited(add: Callable[..., Region], limit: int) -> Callable[..., Region]:
    """GuestMemory.add under RLIMIT_AS = `limit` bytes, the process's own limit put back after."""
    def limited(*args: Any, **kwargs: Any) -> Region:
        saved = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (limit, saved[1]))
        try:
            return add(*args, **kwargs)
        finally:
            resource.setrlimit(resource.RLIMIT_AS, saved)
    return limited


def vcpu_mappings() -> int:
    """kvm_run mappings in this process (anon_inode:kvm-vcpu:N in /proc/self/maps)."""
    with open("/proc/self/maps") as f:
        return sum("kvm-vcpu" in line for line in f)


@pytest.mark.parametrize("failure", ["too many vCPUs", "more RAM than KVM takes in one memory slot",
                                     "more RAM than the host can map", "late in construction"])
def test_a_vm_whose_construction_fails_leaks_nothing(failure: str, monkeypatch: pytest.MonkeyPatch) -> None:
    Vm(cpus=1, mem_mib=16).close()  # the kick handler and lazily made objects exist from now on
    cpus, mem_mib = 2, 64
    if failure == "too many vCPUs":
        cpus = 4096
    elif failure == "more RAM than KVM takes in one memory slot":
        mem_mib = (1 << 28) - (1 << 12)  # 256 TiB less 4 GiB: all of a 48-bit address space
    elif failure == "more RAM than the host can map":
        # an address-space limit just above what the process maps now: guest RAM's mapping is
        # the first thing that does not fit (mapped with MAP_NORESERVE, only a limit stops it)
        limit = (mapped_kib() << 10) + (32 << 20)
        monkeypatch.setattr(GuestMemory, "add", address_space_limited(GuestMemory.add, limit))
    else:
        def broken(self: Gic, mpidrs: list[int]) -> None:
            raise VmmError("injected failure after the vCPUs and the vGIC exist")
        monkeypatch.setattr(Gic, "finalize", broken)
    fds, mapped, vcpu_maps = open_fds(), mapped_kib(), vcpu_mappings()
    with pytest.raises(VmmError) as caught:
        Vm(cpus=cpus, mem_mib=mem_mib)
    if failure.startswith("more RAM"):
        assert str(caught.value).startswith(f"cannot map {mem_mib} MiB of guest RAM"), caught.value
    assert open_fds() == fds
    assert vcpu_mappings() == vcpu_maps  # no vCPU's kvm_run is still mapped
    assert mapped_kib() - mapped < 16 << 10  # nor the 64 MiB of guest RAM


def stop_from(vm: Vm, seen: list[str]) -> Callable[[Vcpu], None]:
    def look(vcpu: Vcpu) -> None:
        seen.append(threading.current_thread().name)
        vm.stop("the request ran")
    return look


def test_a_request_queued_before_run_runs_although_the_guest_never_exits(payload_vm: MakePayloadVm) -> None:
    vm = payload_vm(guest("spin")).vm
    seen: list[str] = []
    vm.vcpus[0].request(stop_from(vm, seen))
    result = vm.run(timeout=30)
    assert (result.reason, result.message) == ("stopped", "the request ran"), result
    assert seen == ["vcpu0"] and result.elapsed < 15


class QueuesOnReset(Service):
    """A service whose reset hook (run while every vCPU is stopped) queues work on vCPU 0."""

    name = "queues on reset"

    def __init__(self, vm: Vm, seen: list[str]) -> None:
        self.vm, self.seen = vm, seen

    def reset(self) -> None:
        self.vm.vcpus[0].request(stop_from(self.vm, self.seen))


def test_a_request_queued_during_a_reset_runs_although_the_guest_never_exits(payload_vm: MakePayloadVm) -> None:
    vm = payload_vm(guest("reset_spin")).vm
    seen: list[str] = []
    vm.smccc.add_service(QueuesOnReset(vm, seen))
    result = vm.run(timeout=30)
    assert (result.reason, result.message) == ("stopped", "the request ran"), result
    assert vm.resets == 1 and seen == ["vcpu0"]


@NEEDS_FILTER
def test_a_reset_returns_the_vgic_to_its_initial_state(payload_vm: MakePayloadVm) -> None:
    """On a vGICv3, or a vGICv2 where that is all the host has (the guest finds which: banked
    SGI/PPI registers in the distributor, a memory-mapped CPU interface)."""
    v2 = probe().gic == 2
    run = payload_vm(guest("gic_reset"))
    vm = run.vm
    assert vm.gic.version == (2 if v2 else 3)
    result = run.run(60).result
    assert result.ok, result
    assert vm.resets == 1
    assert [v[0] for v in run.tagged(1)] == [1, 2]
    (set_dist, after_dist), (set_private, after_private), (set_cpu, after_cpu) = (
        [v[:5] for v in run.tagged(tag)] for tag in (2, 3, 4))
    ppi20 = 1 << 20
    enabled = 1 if v2 else 2  # GICD_CTLR: a GICv2's Enable, a GICv3's EnableGrp1A
    # boot 1 set them (SPIs 32-63 enabled, pending, active; priorities; the distributor on)
    assert set_dist[:4] == (0xFFFF_FFFF, 0xFFFF_FFFF, 0xFFFF_FFFF, 0xA0A0_A0A0) and set_dist[4] & enabled
    assert set_private[:4] == (0xFFFF | ppi20, ppi20, ppi20, 0xA0A0_A0A0)
    # PMR, the CPU interface's enable, ICFGR2 (level), IGROUPR1: moved out of the group they start in
    assert set_cpu[:4] == (0xF0, 1, 0, 0xFFFF_FFFF if v2 else 0)
    # after the reset: nothing enabled but the SGIs, pending or active, priorities 0, all off,
    # the configuration KVM_DEV_ARM_VGIC_CTRL_INIT leaves (arch/arm64/kvm/vgic/vgic-init.c:
    # SPIs edge-triggered, in Group 0 on a GICv2 and Group 1 on a GICv3)
    assert after_dist[:4] == (0, 0, 0, 0) and not after_dist[4] & enabled
    assert after_private[:4] == (0xFFFF, 0, 0, 0)
    assert after_cpu[:4] == (0, 0, 0xAAAA_AAAA, 0 if v2 else 0xFFFF_FFFF)


@pytest.mark.host(gic=3, its=True, reason="an ITS (--irqchip=gicv3-its) needs KVM's vGICv3 ITS")
def test_a_reset_turns_the_its_and_the_lpis_off(payload_vm: MakePayloadVm) -> None:
    """A guest that enabled the ITS and its LPIs reboots into an ITS with no command queue, off,
    and a redistributor with LPIs off and no LPI table, as KVM_DEV_ARM_VGIC_CTRL_INIT left them."""
    vm = payload_vm(guest("its_reset"), irqchip="gicv3-its").vm
    result = vm.run(timeout=60)
    assert result.reason == "poweroff" and vm.resets == 1, result
    records = vm.memory.read(RAM_BASE + 0x11000, 64)
    (its_on, cbaser, lpis_on, propbaser), after = (
        [int.from_bytes(records[at + 8 * n:at + 8 * n + 8], "little") for n in range(4)] for at in (0, 32))
    # boot 1's set-up took: the queue 128 KiB and the table 192 KiB above the image
    assert its_on & 1 and cbaser >> 63 and cbaser & 0xF_FFFF_FFFF_F000 == RAM_BASE + 0x20000, hex(cbaser)
    assert lpis_on & 1 and propbaser & 0xF_FFFF_FFFF_F000 == RAM_BASE + 0x30000, hex(propbaser)
    its_on, cbaser, lpis_on, propbaser = after
    # KVM reports its own cacheability attributes in an empty PROPBASER; no table, no INTID bits
    assert (its_on & 1, cbaser, lpis_on & 1, propbaser & 0xF_FFFF_FFFF_F01F) == (0, 0, 0, 0), [hex(v) for v in after]


class Stuck:
    """An SMCCC handler that does not return until released."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, call: SmcccCall) -> int:
        self.entered.set()
        self.release.wait()
        return 0


@NEEDS_FILTER
def test_a_vcpu_that_will_not_stop_keeps_its_fds_and_mappings(payload_vm: MakePayloadVm) -> None:
    vm = payload_vm(guest("hvc_loop")).vm
    stuck = Stuck()
    vm.smccc.register(SIP64, 1, stuck, "stuck")
    vm.vcpus[0].set_x(9, 1)
    vm.vcpus[0].set_x(10, SIP64)
    started = time.monotonic()
    result = vm.run(timeout=1)
    assert result.reason == "timeout" and time.monotonic() - started < 15
    assert "vcpu0 did not stop within" in str(result) and "__call__() at test_lifecycle.py" in str(result)
    vcpu_fd, ram = vm.vcpus[0].fd.fd, vm.memory.regions[0]
    vm.close()  # must keep what the stuck thread may still touch
    os.fstat(vcpu_fd)  # still open: its number cannot go to another VM
    assert not ram.mapping.closed
    other = Vm(cpus=1, mem_mib=16)
    try:
        assert other.vcpus[0].fd.fd != vcpu_fd
    finally:
        other.close()
    stuck.release.set()  # the handler returns; the thread writes x0 through its own fd and ends
    thread = vm.vcpus[0].thread
    assert thread is not None
    thread.join(10)
    assert not thread.is_alive()


STUCK_AT = "handle() at never.py:9"


def stuck_guest(payloads: Payloads, tmp_path: Path, timeout: int) -> list[str]:
    """A `pyvmm run` whose guest calls a --service handler that never returns (STUCK_AT); the
    handler makes tmp_path/stuck as it starts (wait_until_stuck)."""
    service = tmp_path / "never.py"
    service.write_text(f"import time\n\nRANGE = (0xC6000000, 0x100)\n\n\ndef handle(call):\n"
                       f"    open({str(tmp_path / 'stuck')!r}, 'w').close()\n"
                       f"    while True:\n        time.sleep(0.1)\n")
    return [sys.executable, "-m", "pyvmm", "run", "-f", str(payloads.build("examples/guests/smccc_demo.S")), "-c", "2",
            "-m", "16",
            "--service", str(service), "--timeout", str(timeout)]


def wait_until_stuck(p: subprocess.Popen[str], tmp_path: Path) -> None:
    """Until the guest's call is in the handler that never returns (a signal before then finds
    pyvmm still setting up, which ends it otherwise)."""
    deadline = time.monotonic() + 120
    while not (tmp_path / "stuck").exists():
        assert p.poll() is None and time.monotonic() < deadline, "the guest never reached the stuck service"
        time.sleep(0.05)


@NEEDS_FILTER
def test_a_service_that_never_returns_is_stopped_by_the_timeout(pyvmm_payloads: Payloads, tmp_path: Path) -> None:
    started = time.monotonic()
    p = subprocess.run(stuck_guest(pyvmm_payloads, tmp_path, 2), capture_output=True, text=True, timeout=60)
    took = time.monotonic() - started
    assert p.returncode == cli.EXIT_TIMEOUT, p.stderr
    line, = errors(p.stderr)
    assert line.startswith("pyvmm: guest ended: timeout: the guest was still running after 2 s; vcpu0 did not stop")
    assert STUCK_AT in line
    assert took < 30


def test_sigterm_during_a_linux_boot_stops_cleanly(tmp_path: Path) -> None:
    image, initrd = linux_guest()
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    p = subprocess.Popen([sys.executable, "-m", "pyvmm", "run", "-c", "2", "-m", "256", "-k", str(image), "-i",
                          str(initrd), "-d", str(disk), "-p", "pyvmm.run=sleep,600", "--timeout", "300"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None
    seen = b""
    deadline = time.monotonic() + 200
    while b"Booting Linux" not in seen:  # the kernel is running: SMCCC calls, MMIO, virtio set-up
        assert time.monotonic() < deadline and p.poll() is None, seen[-2000:]
        if select.select([p.stdout], [], [], 1.0)[0]:
            seen += os.read(p.stdout.fileno(), 4096)
    p.send_signal(signal.SIGTERM)
    started = time.monotonic()
    out, err = p.communicate(timeout=60)
    assert time.monotonic() - started < 20
    assert p.returncode == 128 + signal.SIGTERM
    assert errors(err) == ["pyvmm: guest ended: stopped: stopped by SIGTERM"]


def catches(pid: int, signo: int) -> bool:
    """Whether process `pid` has a handler for `signo` (/proc/PID/status SigCgt, proc(5))."""
    try:
        with open(f"/proc/{pid}/status") as f:
            caught = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    except (FileNotFoundError, StopIteration):
        return False
    return bool(caught >> (signo - 1) & 1)


def holds_open(pid: int, path: Path) -> bool:
    """Whether process `pid` has `path` open (it is reading it)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") == str(path):
                return True
    return False


@pytest.mark.parametrize("moment", ["one second after start", "while it loads the images",
                                    "while the control socket comes up"])
def test_sigterm_during_set_up_ends_pyvmm_with_143_and_one_line(tmp_path: Path, moment: str) -> None:
    """From its first instant: a signal before the guest runs ends pyvmm as one while it runs does,
    and leaves nothing behind (the control socket, the disk's lock). "One second after start" is
    also no sooner than pyvmm can take the signal at all: in an emulated host under load the
    interpreter itself may not be up after a second (natively it is within a few tens of ms),
    and until then a signal's default action is the only one there is."""
    image, initrd = linux_guest()
    disk, control = tmp_path / "disk.img", tmp_path / "vm.sock"
    disk.write_bytes(bytes(1 << 20))
    if moment == "while it loads the images":
        initrd = tmp_path / "big-initrd"  # long enough to read that the test sees it open
        with open(initrd, "wb") as f:
            f.truncate(384 << 20)
    argv = [sys.executable, "-m", "pyvmm", "run", "-c", "1", "-m", "512", "-k", str(image), "-i", str(initrd),
            "-d", str(disk), "--control", str(control), "-p", "pyvmm.run=sleep,600", "--timeout", "300"]
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    started = time.monotonic()
    reached: dict[str, Callable[[], bool]] = {
        "one second after start": lambda: time.monotonic() - started >= 1 and catches(p.pid, signal.SIGTERM),
        "while it loads the images": lambda: holds_open(p.pid, initrd),
        "while the control socket comes up": control.exists,
    }
    while not reached[moment]():
        assert p.poll() is None and time.monotonic() - started < 120, f"pyvmm went past the moment: {p.returncode}"
        time.sleep(0.001)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM, err
    line, = errors(err)
    # before the VM is made the set-up unwinds; after, the VM is stopped as a running one is
    assert line in ("pyvmm: stopped by SIGTERM before the guest ran",
                    "pyvmm: guest ended: stopped: stopped by SIGTERM"), line
    assert not control.exists()
    with open(disk, "rb+") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # no pyvmm holds it


@NEEDS_FILTER
def test_a_second_sigint_while_stopping_ends_pyvmm_at_once(pyvmm_payloads: Payloads, tmp_path: Path) -> None:
    p = subprocess.Popen(stuck_guest(pyvmm_payloads, tmp_path, 100), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    wait_until_stuck(p, tmp_path)
    p.send_signal(signal.SIGINT)  # stopping: its vCPU will not stop for a while
    time.sleep(1)
    started = time.monotonic()
    p.send_signal(signal.SIGINT)
    p.communicate(timeout=30)
    assert p.returncode == 128 + signal.SIGINT
    assert time.monotonic() - started < 3


@NEEDS_FILTER
@pytest.mark.parametrize("signo", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_one_signal_stops_a_stuck_guest_with_its_status(pyvmm_payloads: Payloads, tmp_path: Path,
                                                        signo: signal.Signals) -> None:
    """A vCPU stuck in a service handler cannot stop, yet one signal still ends pyvmm with
    128 + N once the grace period is over, the line naming where the vCPU is stuck."""
    p = subprocess.Popen(stuck_guest(pyvmm_payloads, tmp_path, 100), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    wait_until_stuck(p, tmp_path)
    p.send_signal(signo)
    started = time.monotonic()
    _, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signo, err
    assert time.monotonic() - started < STOP_GRACE + 10
    line, = err.strip().splitlines()
    assert line.startswith(f"pyvmm: guest ended: stopped: stopped by {signo.name}; vcpu0 did not stop") and \
        STUCK_AT in line, line

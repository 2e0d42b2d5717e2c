"""The guest sees the host's CPU (pyvmm/machine/cpu_features.py), on real KVM: assembled guests read the
ID registers and execute an SVE, a pointer-authentication and an MTE-tagged instruction, count
cycles and take the PMU's overflow interrupt, and find PV stolen time and watch it advance; a
Linux guest lists the features in /proc/cpuinfo. What the host's KVM does not offer is checked
to be absent (pyvmm check lists it: host_shape().cpu), and every flag takes its feature away."""

from __future__ import annotations

import glob
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from pyvmm import cli
from pyvmm.errors import KvmUnavailableError
from pyvmm.machine.cpu_features import PVTIME_BASE, CpuOptions
from pyvmm.machine.vm import RAM_BASE, Vm
from pyvmm.testing.payloads import MakePayloadVm, PayloadRun
from tests.conftest import host_shape, linux_guest
from tests.kvm.conftest import NEEDS_FILTER, guest, s64

NOT_SUPPORTED = -1
ESR_EC_TAG_CHECK = 0x25  # a data abort from the same EL
DFSC_TAG_CHECK = 0x11  # synchronous tag check fault


def finished(run: PayloadRun) -> PayloadRun:
    assert run.run(120).reason == "poweroff", run.result
    return run


def refused_without(feature: str, named: str, cpu: CpuOptions, aarch32: bool = False) -> bool:
    """Where the host's KVM lacks `feature` (pyvmm check: host_shape().cpu), asking for it is one
    line naming it: checked, and True (the test has nothing more to run here)."""
    if feature in host_shape().cpu:
        return False
    with pytest.raises(KvmUnavailableError, match=f"offers no {named}"):
        Vm(cpu=cpu, aarch32=aarch32).close()
    return True


def field(value: int, lsb: int, width: int = 4) -> int:
    return value >> lsb & ((1 << width) - 1)


def index_sum(vl_bytes: int) -> int:
    """UADDV of INDEX Z0.B, #1, #1: the bytes 1, 2, ... wrapping at 256."""
    return sum((i + 1) % 256 for i in range(vl_bytes))


def host_cpu_features() -> set[str]:
    """What the host kernel says its own CPU has (/proc/cpuinfo's Features, arch/arm64/kernel/cpuinfo.c)."""
    with open("/proc/cpuinfo") as f:
        return next(set(line.split(":", 1)[1].split()) for line in f if line.startswith("Features"))


def test_pyvmm_finds_what_the_hosts_own_cpu_has() -> None:
    """The tests here branch on what `pyvmm check` finds (KVM_CHECK_EXTENSION); witnesses that
    do not ask KVM keep that finding honest: the host kernel's view of its own CPU and PMU, its
    version, and its GIC. In the emulated host (QEMU's `max` CPU with MTE) every one is there."""
    have, cpu = host_shape().cpu, host_cpu_features()
    assert ("sve" in have) == ("sve" in cpu)
    assert ("ptrauth" in have) == ({"paca", "pacg"} <= cpu)
    assert ("mte" in have) == ("mte" in cpu)
    assert ("pmu" in have) == bool(glob.glob("/sys/bus/event_source/devices/armv8_pmuv3*"))
    major, minor = (int(n) for n in os.uname().release.split(".")[:2])
    assert ("pvtime" in have) == ((major, minor) >= (5, 10))  # KVM_CAP_STEAL_TIME on arm64
    assert host_shape().its == (host_shape().gic == 3)  # KVM emulates an ITS for any vGICv3


@NEEDS_FILTER  # the guest reports through a forwarded call
def test_the_guest_gets_the_hosts_sve_pac_and_mte(payload_vm: MakePayloadVm) -> None:
    have = host_shape().cpu
    run = finished(payload_vm(guest("cpu_features")))
    (pfr0, pfr1, isar1, _), = [r[:4] for r in run.tagged(1)]
    assert bool(field(pfr0, 32)) == ("sve" in have)
    assert bool(field(isar1, 4, 8)) == ("ptrauth" in have)  # APA/API
    assert (field(pfr1, 8) >= 2) == ("mte" in have)
    if "sve" in have:
        (vl, total, fault), = [r[:3] for r in run.tagged(2)]
        assert (vl * 8, total, fault) == (host_shape().sve_max_vl, index_sum(vl), 0)
    if "ptrauth" in have:
        (pointer, signed, authenticated, pacga, fault), = run.tagged(3)
        assert signed != pointer and authenticated == pointer and pacga and fault == 0
    if "mte" in have:
        (tag, value, wrong_tag, fault), = [r[:4] for r in run.tagged(4)]
        assert (tag, value, fault) == (5, 0x7A6, 0)
        assert field(wrong_tag, 26, 6) == ESR_EC_TAG_CHECK and field(wrong_tag, 0, 6) == DFSC_TAG_CHECK


@NEEDS_FILTER
@pytest.mark.parametrize("bits", [128, 256])
def test_sve_max_vl_caps_the_vector_length(payload_vm: MakePayloadVm, bits: int) -> None:
    if refused_without("sve", "SVE", CpuOptions(sve_max_vl=bits)):
        return
    run = finished(payload_vm(guest("cpu_features"), cpu=CpuOptions(sve_max_vl=bits)))
    (vl, total, fault), = [r[:3] for r in run.tagged(2)]
    assert (vl, total, fault) == (bits // 8, index_sum(bits // 8), 0)


@NEEDS_FILTER  # the guest reports through a forwarded call
def test_each_feature_turned_off_is_gone_from_the_guest(payload_vm: MakePayloadVm) -> None:
    run = finished(payload_vm(guest("cpu_features"), cpu=CpuOptions(sve=False, ptrauth=False, mte=False)))
    (pfr0, pfr1, isar1, _), = [r[:4] for r in run.tagged(1)]
    assert (field(pfr0, 32), field(isar1, 4, 8), field(pfr1, 8)) == (0, 0, 0)
    assert not run.tagged(2) and not run.tagged(3) and not run.tagged(4)


@NEEDS_FILTER  # the guest reports through a forwarded call
def test_the_pmu_counts_cycles_and_raises_its_overflow_interrupt(payload_vm: MakePayloadVm) -> None:
    if refused_without("pmu", "PMU", CpuOptions(pmu=True)):
        return
    run = finished(payload_vm(guest("pmu"), cpu=CpuOptions(pmu=True)))
    (version, counters), = [r[:2] for r in run.tagged(1)]
    assert version and counters  # PMUv3 and its event counters
    (before, after), = [r[:2] for r in run.tagged(2)]
    assert after > before
    (intid, overflow), = [r[:2] for r in run.tagged(3)]
    assert intid == 23 and overflow >> 31 & 1  # PPI 7, the cycle counter's overflow
    # without --pmu the guest has none (ID_AA64DFR0_EL1.PMUVer 0): it says so and stops
    run = finished(payload_vm(guest("pmu")))
    assert [r[0] for r in run.tagged(1)] == [0] and not run.tagged(2)


def test_an_aarch32_guest_counts_cycles_with_the_pmu(payload_vm: MakePayloadVm) -> None:
    """--aarch32 --pmu: the guest's CP15 PMCR shows PMUv3's event counters and its cycle counter
    runs (the guest records what it read in RAM: no forwarded call, so every shape runs it)."""
    if refused_without("pmu", "PMU", CpuOptions(pmu=True), aarch32=True):
        return
    vm = finished(payload_vm(guest("a32/pmu32"), aarch32=True, cpu=CpuOptions(pmu=True))).vm
    pmcr, first, second = struct.unpack("<3I", vm.memory.read(RAM_BASE + 0x10000, 12))
    assert pmcr >> 11 & 0x1F and second > first, (hex(pmcr), first, second)  # PMCR.N counters; cycles


@contextmanager
def one_busy_cpu() -> Iterator[None]:
    """This process's threads (the vCPU's too, made later) on one CPU, with a busy process there
    as well: the vCPU waits for its CPU, which is stolen time."""
    cpu = min(os.sched_getaffinity(0))
    saved = os.sched_getaffinity(0)
    hog = subprocess.Popen([sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"])
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, saved)
        hog.kill()
        hog.wait()


@NEEDS_FILTER  # the guest reports through a forwarded call
def test_pv_time_is_found_through_smccc_and_stolen_time_advances(payload_vm: MakePayloadVm) -> None:
    if refused_without("pvtime", "PV stolen time", CpuOptions(pvtime=True)):
        return
    with one_busy_cpu():
        run = finished(payload_vm(guest("pv_time")))
    (arch_features, features, structure, call_count), = [r[:4] for r in run.tagged(1)]
    # owner 5's Call Count counts the two calls KVM answers itself
    assert (s64(arch_features), s64(features), structure, call_count) == (0, 0, PVTIME_BASE, 2)
    (header, before, after), = [r[:3] for r in run.tagged(2)]
    assert header == 0 and after > before


@NEEDS_FILTER  # the guest reports through a forwarded call
def test_no_pvtime_has_kvm_refuse_every_pv_time_call(payload_vm: MakePayloadVm) -> None:
    run = finished(payload_vm(guest("pv_time"), cpu=CpuOptions(pvtime=False)))
    (arch_features, features, structure, call_count), = [r[:4] for r in run.tagged(1)]
    assert [s64(arch_features), s64(features), s64(structure), call_count] == [NOT_SUPPORTED] * 3 + [0]
    assert not run.tagged(2)


def test_a_linux_guest_lists_the_features_and_the_flags_take_them_away() -> None:
    image, initrd = linux_guest()
    have = host_shape().cpu
    show = "pyvmm.run=grep,-m1,Features,/proc/cpuinfo;dmesg|grep,-i,-e,sve:,-e,arm-pv,-e,perfevents"

    def boot(*flags: str) -> str:
        p = subprocess.run([sys.executable, "-m", "pyvmm", "run", "-c", "1", "-m", "256", "-k", str(image), "-i",
                            str(initrd), "-p", show, "--timeout", "240", *flags], capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == cli.EXIT_OK, p.stdout[-2000:] + p.stderr
        return p.stdout

    out = boot(*(["--pmu"] if "pmu" in have else []))
    features = next(line for line in out.splitlines() if line.startswith("Features")).split()
    assert ("sve" in features) == ("sve" in have) and ("paca" in features) == ("ptrauth" in have)
    assert ("mte" in features) == ("mte" in have)
    assert ("using stolen time PV" in out) == ("pvtime" in have)
    assert ("PMU driver" in out) == ("pmu" in have)
    if "sve" in have:
        assert f"SVE: maximum available vector length {host_shape().sve_max_vl // 8} bytes per vector" in out
    out = boot("--disable-mte", "--no-pvtime", *(["--sve-max-vl", "128"] if "sve" in have else []))
    features = next(line for line in out.splitlines() if line.startswith("Features")).split()
    assert "mte" not in features and "using stolen time PV" not in out and "PMU driver" not in out
    if "sve" in have:
        assert "SVE: maximum available vector length 16 bytes per vector" in out

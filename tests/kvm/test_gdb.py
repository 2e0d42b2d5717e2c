"""The GDB stub against real KVM, driven by GDB itself (Debian's gdb, or gdb-minimal in the
emulated host) in batch mode, against tests/guests/gdb_target.S built as an ELF with symbols."""

from __future__ import annotations

import os
import pty
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyvmm.testing.payloads import Payloads
from tests.conftest import NO_FILTER_NOTE, host_shape
from tests.kvm.conftest import guest, needs_filter

ROOT = Path(__file__).resolve().parents[2]
GDB = shutil.which("gdb") or shutil.which("gdb-multiarch")
GUEST_TIMEOUT = 240  # the --timeout of every guest run here


@pytest.fixture
def target(pyvmm_payloads: Payloads) -> Path:
    """gdb_target's flat binary, with its ELF file (symbols, linked where pyvmm loads it) beside it."""
    return pyvmm_payloads.build(guest("gdb_target"))


def elf(binary: Path) -> str:
    return str(binary.with_suffix(".elf"))


def start_vm(binary: Path, *args: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "pyvmm", "run", "-f", str(binary), "-c", "2",
           "--timeout", str(GUEST_TIMEOUT), *args]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_listening(vm: subprocess.Popen[str]) -> str:
    """The stub's address from pyvmm's first stderr line (after the no-SMCCC-filter note, if any)."""
    assert vm.stderr is not None
    line = vm.stderr.readline()
    while NO_FILTER_NOTE in line:
        line = vm.stderr.readline()
    m = re.search(r"GDB stub listening on (\S+?)(;|$)", line)
    assert m, f"pyvmm did not start its GDB stub: {line!r}"
    return m.group(1)


def remote(address: str) -> str:
    """`target remote`'s argument for a stub address."""
    kind, _, rest = address.partition(":")
    return rest if kind == "tcp" else address.removeprefix("unix:")


def gdb(address: str, binary: Path, *commands: str, timeout: float = 90) -> str:
    assert GDB is not None, "no gdb on this host (tools/host-deps.sh installs it)"
    argv = [GDB, "-nx", "-batch", "-ex", "set pagination off", "-ex", "set confirm off",
            "-ex", f"target remote {remote(address)}", elf(binary)]
    for c in commands:
        argv += ["-ex", c]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:  # what it said so far, for the failure's message
        said = [x.decode(errors="replace") if isinstance(x, bytes) else x or "" for x in (e.stdout, e.stderr)]
        return "".join(said) + f"\n(GDB did not finish within {timeout:g} s)"
    return out.stdout + out.stderr


def finish(vm: subprocess.Popen[str], gdb_output: str, timeout: float = 30) -> tuple[int, str, str]:
    try:
        out, err = vm.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        vm.kill()
        out, err = vm.communicate()
        pytest.fail(f"pyvmm did not end: {err}\nGDB said:\n{gdb_output}")
    return vm.returncode, out, err


def value(output: str, expr_tag: str) -> int:
    """The value GDB printed for `print/x` whose line starts with `$N = ` after a `echo TAG\\n`."""
    m = re.search(re.escape(expr_tag) + r"\n\$\d+ = (0x[0-9a-f]+)", output)
    assert m, f"no value after {expr_tag!r} in:\n{output}"
    return int(m.group(1), 16)


def show(tag: str, expr: str) -> list[str]:
    return [f"echo {tag}\\n", f"print/x {expr}"]


ALIAS = "(0x40000000 + ((long)&magic - 0x80000000))"


@needs_filter("GDB catches and traces the SMCCC calls pyvmm is forwarded")
def test_break_registers_step_memory_watch_catch_threads_detach(target: Path, tmp_path: Path) -> None:
    sock = str(tmp_path / "gdb.sock")
    vm = start_vm(target, "--gdb", f"unix:{sock}", "--gdb-wait")
    out = ""
    try:
        address = wait_listening(vm)
        out = gdb(address, target,
                  "info threads",
                  "break *regs_set", "continue",
                  "info registers x19 x20 x21",
                  *show("X19", "$x19"), *show("X20", "$x20"), *show("PC1", "$pc"),
                  *show("REGSET", "&regs_set"),
                  "stepi", *show("PC2", "$pc"),
                  *show("MAGIC0", "*(long *)&magic"), "set var *(long *)&magic = 0x2222",
                  "delete",
                  "watch *(long *)&watched", "continue", *show("PC3", "$pc"), *show("AFTER", "&after_store"),
                  "delete",
                  "monitor smccc trace on", "monitor catch smccc 0xc4000003", "continue",
                  *show("CALL_X0", "$x0"), *show("CALL_X1", "$x1"), *show("SECONDARY", "&secondary"),
                  *show("CALL_X2", "$x2"),
                  "monitor catch smccc off",
                  *show("PC_CALL", "$pc"), *show("CPU_ON_DONE", "&cpu_on_done"),
                  "hbreak *mmu_on", "continue", *show("PC4", "$pc"), *show("MMU_ON", "&mmu_on"),
                  "monitor smccc trace off", "delete",
                  "info threads",
                  *show("ALIAS", f"*(long *){ALIAS}"),
                  f"set var *(long *){ALIAS} = 0x5555",
                  *show("IDENTITY", "*(long *)&magic"),
                  "x/gx 0x10000000",
                  # only vCPU 0 runs (vCont;c:1), to the guest's read of what GDB wrote
                  "set scheduler-locking on", "break *check_magic", "continue", *show("GUEST_X2", "$x2"),
                  "set scheduler-locking off", "delete",
                  # a breakpoint vCPU 1 meets (vCPU 0 goes on to spin in wait_release)
                  "break *secondary", "continue", *show("PC5", "$pc"), *show("SECONDARY2", "&secondary"),
                  "delete", "set var *(long *)&release = 1",
                  "delete", "detach")
    finally:
        status, _, err = finish(vm, out)
    assert "Thread 1" in out and "Thread 2" in out, out
    assert re.search(r"x19\s+0x1919000000001919\s", out) and re.search(r"x21\s+0x21\s+33", out), out
    assert value(out, "X19") == 0x1919_0000_0000_1919
    assert value(out, "X20") == 0x2020_0000
    assert "Thread 1 hit Breakpoint 1, 0x" in out and "in regs_set ()" in out, out  # vCPU 0, at the symbol
    assert value(out, "PC1") == value(out, "REGSET")
    assert value(out, "PC2") == value(out, "REGSET") + 4
    assert value(out, "MAGIC0") == 0x1111
    assert "atchpoint" in out and "New value = 4660" in out, out  # 0x1234 stored by the guest
    assert value(out, "PC3") == value(out, "AFTER")
    assert "vCPU 0 stopped at SMCCC call 0xc4000003 (CPU_ON, PSCI) over HVC" in out, out
    assert value(out, "CALL_X0") == 0xC400_0003
    assert value(out, "CALL_X1") == 1  # the target MPIDR
    assert value(out, "CALL_X2") == value(out, "SECONDARY")
    assert value(out, "PC_CALL") == value(out, "CPU_ON_DONE")  # past the HVC
    assert "Hardware assisted breakpoint" in out and value(out, "PC4") == value(out, "MMU_ON"), out
    assert re.search(r"\[vcpu0 hvc\] CPU_ON\(", out), out  # the trace, in GDB's console
    assert value(out, "ALIAS") == 0x2222  # written with the MMU off, read through the new mapping
    assert value(out, "IDENTITY") == 0x5555
    assert "Cannot access memory at address 0x10000000" in out, out
    assert re.search(r"Thread 2 hit Breakpoint \d+, 0x[0-9a-f]+ in secondary \(\)", out), out  # every vCPU
    assert value(out, "PC5") == value(out, "SECONDARY2")
    assert value(out, "GUEST_X2") == 0x5555  # the guest read what GDB wrote
    assert status == 0, err  # detached, the guest went on to power off


def test_sve_registers_read_and_written_at_the_vector_length(pyvmm_payloads: Payloads, tmp_path: Path) -> None:
    """With SVE (on wherever KVM offers it), GDB gets org.gnu.gdb.aarch64.sve: Z registers as
    long as the vCPU's vectors, P0-P15, FFR and VG, and V0-V31 derived from Z; what it writes
    past the low 128 bits of a Z register and into a P register is what the guest then reads."""
    have_sve = "sve" in host_shape().cpu
    binary = pyvmm_payloads.build(guest("gdb_sve"))
    vm = start_vm(binary, "--gdb", f"unix:{tmp_path / 'gdb.sock'}", "--gdb-wait")
    out = ""
    try:
        address = wait_listening(vm)
        sve = ["break *sve_set", "continue",
               *show("VG", "$vg"), *show("Z0_1", "$z0.d.u[1]"), *show("Z0_LAST", "$z0.d.u[$vg - 1]"),
               *show("Z1_LAST_BYTE", "$z1.b.u[$vg * 8 - 1]"), *show("V0_1", "$v0.d.u[1]"),
               *show("P0_LAST", "$p0[$vg - 1]"), *show("FFR_0", "$ffr[0]"), *show("VL", "$x19"),
               "set var $z2.d.u[$vg - 1] = 0x0123456789abcdef", "set var $p3[0] = 0x11",
               "break *sve_checked", "continue", *show("LANE", "$x1"), *show("P3_BITS", "$x2")]
        first = "info registers vg" if have_sve else "info registers fpcr"
        out = gdb(address, binary, first, *(sve if have_sve else []), "delete", "detach")
    finally:
        status, _, err = finish(vm, out)
    assert status == 0, err
    if not have_sve:  # the FP/SIMD registers, as ever (pyvmm check says the host has no SVE)
        assert "fpcr" in out and "vg" not in out, out
        return
    vg = value(out, "VG")
    assert vg * 64 == host_shape().sve_max_vl and value(out, "VL") == vg * 8, out  # the longest vectors
    assert value(out, "Z0_1") == 2 and value(out, "Z0_LAST") == vg and value(out, "V0_1") == 2
    assert value(out, "Z1_LAST_BYTE") == 0x5A and value(out, "P0_LAST") == 0x01 and value(out, "FFR_0") == 0xFF
    assert value(out, "LANE") == 0x0123_4567_89AB_CDEF  # the guest's LASTB read what GDB wrote
    assert value(out, "P3_BITS") == 2  # and its CNTP the two bits of 0x11


def test_interrupt_spinning_guest_then_kill(target: Path) -> None:
    vm = start_vm(target, "--gdb", "tcp:127.0.0.1:0")
    out = ""
    try:
        address = wait_listening(vm)
        assert GDB is not None
        argv = [GDB, "-nx", "-batch", "-ex", "set pagination off", "-ex", "set confirm off",
                "-ex", f"target remote {remote(address)}", "-ex", "continue", "-ex", "info threads",
                "-ex", "echo PC\\n", "-ex", "print/x $pc", "-ex", "kill", elf(target)]
        # GDB forwards a SIGINT to the target as Ctrl-C (0x03) when its input is a terminal, as
        # a user's is: a pseudo-terminal stands in for one
        master, slave = pty.openpty()
        try:
            g = subprocess.Popen(argv, stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        finally:
            os.close(slave)
        assert g.stdout is not None
        seen = ""
        deadline = time.monotonic() + 120
        while " in " not in seen and time.monotonic() < deadline:  # attached: "0x... in wait_release ()"
            line = g.stdout.readline()
            if not line:
                break
            seen += line
        assert " in " in seen, seen
        time.sleep(3)  # GDB continues (batch mode says nothing); the guest spins in wait_release
        os.kill(g.pid, signal.SIGINT)
        try:
            rest, _ = g.communicate(timeout=120)
        finally:
            os.close(master)
        out = seen + rest
    finally:
        status, _, err = finish(vm, out)
    assert "SIGINT" in out, out
    assert "Thread 1" in out and "Thread 2" in out, out
    assert status == 3 and "killed from GDB" in err, err

"""The GDB stub's run control, breakpoints and monitor commands against fake vCPUs and RAM; the
debug registers' encodings; the server's address parsing and stop replies. The real thing, with
GDB and KVM, is tests/kvm/test_gdb.py."""

from __future__ import annotations

import errno
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kvm_bindings.constants import (
    KVM_GUESTDBG_ENABLE,
    KVM_GUESTDBG_SINGLESTEP,
    KVM_GUESTDBG_USE_HW,
    KVM_GUESTDBG_USE_SW_BP,
)
from kvm_bindings.regs import KVM_REG_ARM64_SVE_FFR, sve_preg_id, sve_zreg_id
from pyvmm.errors import KvmIoctlError, SmcccFilterUnavailableError, VmmError
from pyvmm.gdb import hw, packets
from pyvmm.gdb import registers as regs
from pyvmm.gdb.breakpoints import BRK, ENOSPC, MAX_SW_BREAKPOINTS
from pyvmm.gdb.debugger import SIGINT, SIGTRAP, Debugger, Stop
from pyvmm.gdb.monitor import Monitor, parse_fid_range
from pyvmm.gdb.server import GdbServer, exit_reply, parse_address, stop_reply
from pyvmm.gdb.target import V_IDS, MachineTarget
from pyvmm.kvm.exits import DebugExit
from pyvmm.machine.memory import GuestMemory
from pyvmm.machine.power import Power
from pyvmm.smccc.dispatcher import Dispatcher

RAM = 0x8000_0000


# --- debug registers (Arm ARM D19.3) -------------------------------------------------------------
def test_breakpoint_slot_matches_an_a64_instruction_at_el1_and_el0() -> None:
    slot = hw.breakpoint_slot(0x8000_1000)
    assert slot == hw.Slot(0b1111 << 5 | 0b11 << 1 | 1, 0x8000_1000)
    with pytest.raises(ValueError, match="4-byte aligned"):
        hw.breakpoint_slot(0x8000_1002)


@pytest.mark.parametrize(("address", "length", "bas", "wvr"), [
    (0x1000, 8, 0xFF, 0x1000), (0x1004, 4, 0xF0, 0x1000), (0x1003, 1, 0x08, 0x1000), (0x1006, 2, 0xC0, 0x1000)])
def test_watchpoint_inside_a_doubleword_uses_the_byte_select(address: int, length: int, bas: int, wvr: int) -> None:
    slot = hw.watchpoint_slot(address, length, "write")
    assert slot.value == wvr
    assert slot.control == 1 | 0b11 << 1 | 0b10 << 3 | bas << 5
    assert all(hw.covers(slot, a) for a in range(address, address + length))
    assert not hw.covers(slot, address - 1) and not hw.covers(slot, address + length)


def test_larger_watchpoints_are_aligned_powers_of_two_with_a_mask() -> None:
    slot = hw.watchpoint_slot(0x1_0000, 0x100, "access")
    assert slot.control == 1 | 0b11 << 1 | 0b11 << 3 | 0xFF << 5 | 8 << 24
    assert hw.covers(slot, 0x1_00FF) and not hw.covers(slot, 0x1_0100)
    for address, length in ((0x1004, 8), (0x1000, 24), (0x1008, 16)):
        with pytest.raises(ValueError):
            hw.watchpoint_slot(address, length, "read")
    with pytest.raises(ValueError):
        hw.watchpoint_slot(0x1000, 4, "execute")


# --- run control against fake vCPUs ----------------------------------------------------------------
class FakeVcpu:
    """Registers in a dict; request() runs the function on a thread of its own, as a vCPU's
    thread would at its next exit."""

    sve_vl = 0  # no SVE

    def __init__(self, index: int) -> None:
        self.index = index
        self.regs = {"pc": RAM, "pstate": 0x3C5, "sp": 0, "sp_el1": 0, "sctlr_el1": 0, "tcr_el1": 0,
                     "ttbr0_el1": 0, "ttbr1_el1": 0}
        self.x = [0] * 31
        self.thread: threading.Thread | None = None
        self.debug: list[int] = []  # every KVM_SET_GUEST_DEBUG control value
        self.on = True

    @property
    def power(self) -> Power:
        return Power.ON if self.on else Power.OFF

    def request(self, fn: Callable[[FakeVcpu], None]) -> None:
        self.thread = threading.Thread(target=fn, args=(self,), daemon=True)
        self.thread.start()

    def on_own_thread(self) -> bool:
        return self.thread is threading.current_thread()

    def set_guest_debug(self, control: int, bcr: list[int], bvr: list[int], wcr: list[int], wvr: list[int]) -> None:
        self.debug.append(control)

    def get_reg(self, name: str) -> int:
        return self.regs[name]

    def set_reg(self, name: str, value: int) -> None:
        self.regs[name] = value

    def get_x(self, n: int) -> int:
        return self.x[n]

    def set_x(self, n: int, value: int) -> None:
        self.x[n] = value

    def get_wide(self, reg_id: int, size: int) -> bytes:
        return bytes(size)

    def set_wide(self, reg_id: int, data: bytes) -> None:
        pass


@pytest.fixture
def machine() -> Iterator[tuple[Debugger, list[FakeVcpu], GuestMemory]]:
    memory = GuestMemory()
    memory.add(RAM, 1 << 16)
    vcpus = [FakeVcpu(0), FakeVcpu(1)]
    debugger = Debugger(vcpus, MachineTarget(vcpus, memory), hw_breakpoints=2, hw_watchpoints=1)
    yield debugger, vcpus, memory
    debugger.close()
    memory.close()


def wait_parked(debugger: Debugger) -> Stop:
    """The stop the server would report, once every vCPU has parked."""
    stop = debugger.take_stop()
    assert stop is not None
    return stop


def test_attach_stops_every_vcpu_and_continue_lets_them_go(machine: tuple[Debugger, list[FakeVcpu], GuestMemory]) -> None:
    debugger, vcpus, _ = machine
    debugger.attach()
    assert wait_parked(debugger) == Stop(0, SIGTRAP, "attach")
    assert all(v.thread is not None and v.thread.is_alive() for v in vcpus)  # both parked
    debugger.resume_vcpus(set(), run_others=True)
    for v in vcpus:
        assert v.thread is not None
        v.thread.join(5)
        assert not v.thread.is_alive()
        assert v.debug[-1] == KVM_GUESTDBG_ENABLE  # attached, nothing set: debug on, no breakpoints


def test_software_breakpoint_writes_brk_shows_the_original_and_restores_it(
        machine: tuple[Debugger, list[FakeVcpu], GuestMemory]) -> None:
    debugger, vcpus, memory = machine
    memory.write(RAM + 0x10, b"\x1f\x20\x03\xd5")  # NOP
    debugger.attach()
    wait_parked(debugger)
    assert debugger.insert(0, RAM + 0x10, 4, 0) == 0
    assert memory.read(RAM + 0x10, 4) == BRK
    assert debugger.read_memory(0, RAM + 0x10, 4) == b"\x1f\x20\x03\xd5"  # GDB sees the instruction
    debugger.write_memory(0, RAM + 0x10, b"\x00\x00\x00\x14")  # GDB patches it: the BRK stays
    assert memory.read(RAM + 0x10, 4) == BRK
    debugger.resume_vcpus({1}, run_others=True)
    for v in vcpus:
        assert v.thread is not None
        v.thread.join(5)
    assert vcpus[0].debug[-1] == KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_SW_BP
    assert vcpus[1].debug[-1] == KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_SW_BP | KVM_GUESTDBG_SINGLESTEP
    # vCPU 0 meets it: KVM_EXIT_DEBUG with ESR class 0x3C at the breakpoint's PC
    vcpus[0].regs["pc"] = RAM + 0x10
    hit = threading.Thread(target=debugger.debug_exit, args=(vcpus[0], DebugExit(0x3C << 26, 0)))
    hit.start()
    assert wait_parked(debugger) == Stop(0, SIGTRAP, "swbreak")
    assert hit.is_alive()  # parked until resumed
    debugger.remove(0, RAM + 0x10, 4)
    assert memory.read(RAM + 0x10, 4) == b"\x00\x00\x00\x14"
    debugger.detach()
    hit.join(5)
    assert not hit.is_alive() and vcpus[0].debug[-1] == 0


def test_hardware_slots_are_bounded_by_what_kvm_reports(machine: tuple[Debugger, list[FakeVcpu], GuestMemory]) -> None:
    debugger, _, _ = machine
    assert debugger.insert(1, RAM, 4, 0) == 0
    assert debugger.insert(1, RAM + 4, 4, 0) == 0
    assert debugger.insert(1, RAM + 8, 4, 0) == ENOSPC
    assert debugger.insert(2, RAM, 8, 0) == 0
    assert debugger.insert(3, RAM + 8, 8, 0) == ENOSPC
    debugger.remove(2, RAM, 8)
    assert debugger.insert(3, RAM + 8, 8, 0) == 0
    assert debugger._control(0) == 0  # noqa: SLF001 - not attached: KVM is left alone
    debugger.attached = True
    assert debugger._control(0) == KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW  # noqa: SLF001


def test_watchpoint_stop_names_the_watch_gdb_set(machine: tuple[Debugger, list[FakeVcpu], GuestMemory]) -> None:
    debugger, vcpus, _ = machine
    debugger.attach()
    wait_parked(debugger)
    debugger.insert(2, RAM + 0x104, 4, 0)
    debugger.resume_vcpus(set(), run_others=True)
    hit = threading.Thread(target=debugger.debug_exit, args=(vcpus[1], DebugExit(0x34 << 26 | 0x40, RAM + 0x100)))
    hit.start()  # an 8-byte store below the watched word: the nearest watch is named
    assert wait_parked(debugger) == Stop(1, SIGTRAP, "watch", RAM + 0x104)
    debugger.detach()
    hit.join(5)


def test_an_smccc_catch_stops_the_caller_and_a_held_call_is_reported_before_the_guest_runs(
        machine: tuple[Debugger, list[FakeVcpu], GuestMemory]) -> None:
    debugger, vcpus, _ = machine
    debugger.attach()
    wait_parked(debugger)
    debugger.set_catches([(0xC400_0003, 0xC400_0003)])
    debugger.resume_vcpus(set(), run_others=True)
    debugger._smccc_call(vcpus[0], 0x8400_0000, 0)  # noqa: SLF001 - not caught: returns at once
    debugger.interrupt()
    assert wait_parked(debugger) == Stop(0, SIGINT, "interrupt")
    # while stopped, vCPU 1 was already in a caught call: it is held there, and the next resume
    # reports it instead of running the guest
    call = threading.Thread(target=debugger._smccc_call, args=(vcpus[1], 0xC400_0003, 0))  # noqa: SLF001
    call.start()
    deadline = time.monotonic() + 5
    while not debugger._events and time.monotonic() < deadline:  # noqa: SLF001
        time.sleep(0.01)
    debugger.resume_vcpus(set(), run_others=True)
    stop = wait_parked(debugger)
    assert stop.reason == "smccc" and stop.cpu == 1 and "0xc4000003" in stop.note
    assert call.is_alive()  # held in the call until the guest runs
    debugger.resume_vcpus(set(), run_others=True)
    call.join(5)
    assert not call.is_alive()


def test_a_client_gone_while_the_guest_runs_leaves_no_guest_debug_behind(
        machine: tuple[Debugger, list[FakeVcpu], GuestMemory]) -> None:
    debugger, vcpus, _ = machine
    debugger.attach()
    wait_parked(debugger)
    debugger.insert(1, RAM, 4, 0)
    debugger.resume_vcpus(set(), run_others=True)
    for v in vcpus:
        assert v.thread is not None
        v.thread.join(5)
        assert v.debug[-1] == KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW
    debugger.detach()  # running: each vCPU is asked to take the plain debug at its next exit
    for v in vcpus:
        assert v.thread is not None
        v.thread.join(5)
        assert v.debug[-1] == 0
    debugger.debug_exit(vcpus[0], DebugExit(0x30 << 26, 0))  # a late hit: no park, no stop
    assert debugger.take_stop() is None and vcpus[0].debug[-1] == 0


def test_a_vcpu_that_never_stops_is_named_in_the_stop(machine: tuple[Debugger, list[FakeVcpu], GuestMemory],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    debugger, vcpus, _ = machine
    monkeypatch.setattr("pyvmm.gdb.debugger.STOP_WAIT", 0.2)
    busy = threading.Event()
    stuck = threading.Thread(target=busy.wait, daemon=True)  # vCPU 1's thread, in a handler that never returns
    stuck.start()
    monkeypatch.setattr(vcpus[1], "request", lambda fn: None)
    vcpus[1].thread = stuck
    debugger.attach()
    stop = wait_parked(debugger)
    assert stop.reason == "attach" and "vCPU 1 did not stop within 0.2 s" in stop.note
    busy.set()
    debugger.detach()


def test_interrupt_names_sigint() -> None:
    assert stop_reply(Stop(1, SIGINT, "interrupt")) == b"T02thread:2;"
    assert stop_reply(Stop(0, SIGTRAP, "swbreak")) == b"T05thread:1;swbreak:;"
    assert stop_reply(Stop(0, SIGTRAP, "awatch", 0x8000_0040)) == b"T05thread:1;awatch:80000040;"
    assert exit_reply("poweroff") == b"W00" and exit_reply("timeout") == b"X09"


def test_a_reset_puts_the_breakpoints_back_into_the_reloaded_image(
        machine: tuple[Debugger, list[FakeVcpu], GuestMemory]) -> None:
    debugger, vcpus, memory = machine
    debugger.attach()
    wait_parked(debugger)
    debugger.insert(0, RAM + 0x20, 4, 0)
    debugger.resume_vcpus(set(), run_others=True)
    debugger.release_waiters()
    memory.write(RAM + 0x20, b"\x01\x02\x03\x04")  # the image is loaded again
    debugger.resume()
    assert memory.read(RAM + 0x20, 4) == BRK
    assert debugger.read_memory(0, RAM + 0x20, 4) == b"\x01\x02\x03\x04"


# --- monitor commands and addresses ------------------------------------------------------------------
def test_monitor_catch_trace_and_errors(machine: tuple[Debugger, list[FakeVcpu], GuestMemory]) -> None:
    debugger, _, _ = machine
    dispatcher = Dispatcher()
    caught: list[object] = []
    debugger._set_watch = caught.append  # noqa: SLF001 - see the hook go in and out
    monitor = Monitor(debugger, dispatcher, lambda: None)
    assert "catching SMCCC calls 0xc4000003-0xc4000005" in monitor.run("catch smccc c4000003-0xc4000005")
    assert caught[-1] is not None
    assert "not catching" in monitor.run("catch smccc off") and caught[-1] is None
    assert "0x00000000-0xffffffff" in monitor.run("catch smccc")
    assert monitor.run("smccc trace on") == "SMCCC trace on\n" and dispatcher.trace is not None
    assert monitor.run("smccc trace off") == "SMCCC trace off\n"
    assert not dispatcher._observed  # noqa: SLF001 - the hot path is plain again
    assert monitor.run("sdei signal 5").startswith("error: this VM runs without SDEI")
    assert monitor.run("catch smccc 1-0").startswith("error:")
    assert monitor.run("frobnicate").startswith("unknown monitor command 'frobnicate'")
    monitor.run("catch smccc off")
    assert monitor.run("catch smccc " + " ".join(str(n) for n in range(300))).startswith("error: at most 256")


def test_software_breakpoints_are_bounded(machine: tuple[Debugger, list[FakeVcpu], GuestMemory]) -> None:
    debugger, _, _ = machine
    for n in range(MAX_SW_BREAKPOINTS):
        assert debugger.insert(0, RAM + 4 * n, 4, 0) == 0
    assert debugger.insert(0, RAM + 4 * MAX_SW_BREAKPOINTS, 4, 0) == ENOSPC
    assert debugger.insert(0, RAM, 4, 0) == 0  # one already there is fine


def test_fid_ranges_and_addresses() -> None:
    assert parse_fid_range("84000000-8400001f") == (0x8400_0000, 0x8400_001F)
    assert parse_fid_range("0xc4000003") == (0xC400_0003, 0xC400_0003)
    with pytest.raises(VmmError):
        parse_fid_range("100000000")
    assert parse_address("tcp:1234") == ("tcp", ("127.0.0.1", 1234))
    assert parse_address("tcp:0.0.0.0:0") == ("tcp", ("0.0.0.0", 0))
    assert parse_address("tcp:[::1]:99") == ("tcp", ("::1", 99))
    assert parse_address("unix:/tmp/s") == ("unix", "/tmp/s")
    for bad in ("1234", "tcp:", "tcp:host:99999", "udp:1", "unix:", "tcp:x:-1"):
        with pytest.raises(VmmError, match="tcp:\\[HOST:\\]PORT or unix:PATH"):
            parse_address(bad)


# --- the server over a real socket -------------------------------------------------------------------
def exchange(sock: socket.socket, data: bytes) -> bytes:
    """Send one packet, return the reply's DATA (acks skipped)."""
    sock.sendall(packets.frame(data))
    return read_reply(sock)


def read_reply(sock: socket.socket) -> bytes:
    """The DATA of the next packet the stub sends (acks skipped)."""
    reply = b""
    while not (b"#" in reply and len(reply) >= reply.index(b"#") + 3):
        chunk = sock.recv(4096)
        assert chunk, "the stub closed the connection"
        reply += chunk
    body = reply[reply.index(b"$") + 1:reply.index(b"#")]
    return packets.decode(body)


def test_a_client_vanishing_mid_packet_is_detached_and_the_next_one_is_served(
        machine: tuple[Debugger, list[FakeVcpu], GuestMemory], tmp_path: Path) -> None:
    debugger, vcpus, _ = machine
    stopped: list[str] = []
    server = GdbServer(f"unix:{tmp_path / 'gdb.sock'}", debugger, Monitor(debugger, Dispatcher(), lambda: None),
                       stopped.append)
    server.start()
    try:
        first = socket.socket(socket.AF_UNIX)
        first.connect(str(tmp_path / "gdb.sock"))
        assert exchange(first, b"?") == b"T05thread:1;"
        assert exchange(first, b"Z0,80000010,4") == b"OK"
        first.sendall(b"$qSupported:multipro")  # and gone, mid-packet
        first.close()
        second = socket.socket(socket.AF_UNIX)
        second.settimeout(10)
        second.connect(str(tmp_path / "gdb.sock"))
        assert exchange(second, b"?") == b"T05thread:1;"
        assert debugger.points.sw == {}  # the first client's breakpoint went with it
        assert exchange(second, b"qfThreadInfo") == b"m1,2"
        assert exchange(second, b"$#}") == b""  # an unknown packet: the empty reply
        assert exchange(second, b"qRcmd," + b"catch smccc 84000000".hex().encode()) \
            == b"catching SMCCC calls 0x84000000 (forwarded ones: calls KVM answers itself never stop)\n".hex().encode()
        second.sendall(b"$?#00")  # a bad checksum is refused with '-'
        assert second.recv(1) == b"-"
        assert exchange(second, b"Z1,-4,4") == b"E16"  # out of the 64-bit address space
        assert exchange(second, b"Z1,10000000000000000,4") == b"E16"
        assert exchange(second, b"vCont;t") == b""
        # vCont;s with no thread steps every vCPU: each takes KVM_GUESTDBG_SINGLESTEP
        second.sendall(packets.frame(b"vCont;s"))
        assert second.recv(1) == b"+"
        for v in vcpus:
            assert v.thread is not None
            v.thread.join(5)
            assert v.debug[-1] & KVM_GUESTDBG_SINGLESTEP
        # A packet while running is acknowledged and ignored (all-stop: only Ctrl-C is heard); once
        # its '+' is back the stub has passed it, so the stop that follows cannot overtake it.
        second.sendall(packets.frame(b"qC"))
        assert second.recv(1) == b"+"
        hit = threading.Thread(target=debugger.debug_exit, args=(vcpus[1], DebugExit(0x32 << 26, 0)))
        hit.start()
        assert read_reply(second) == b"T05thread:2;"
        assert exchange(second, b"QStartNoAckMode") == b"OK"
        second.sendall(b"-")  # no acks now: a '-' asks for nothing
        assert exchange(second, b"qC") == b"QC2"
        assert exchange(second, b"D") == b"OK"
        second.close()
    finally:
        server.close()
    for v in vcpus:
        assert v.thread is not None
        v.thread.join(5)
        assert not v.thread.is_alive()  # detached: running again
    assert stopped == []


def test_a_catch_the_host_cannot_have_is_not_recorded() -> None:
    """Without the SMCCC filter the dispatcher refuses the watch: the catch list stays as it was,
    so `monitor catch smccc` does not later claim calls it will never stop at."""
    memory = GuestMemory()
    memory.add(RAM, 1 << 16)
    vcpus = [FakeVcpu(0)]
    smccc = Dispatcher()
    smccc.filter_missing = True

    def set_watch(hook: Callable[..., None] | None) -> None:
        smccc.watch = hook

    debugger = Debugger(vcpus, MachineTarget(vcpus, memory), hw_breakpoints=2, hw_watchpoints=1, set_watch=set_watch)
    try:
        with pytest.raises(SmcccFilterUnavailableError, match="^catching SMCCC calls needs KVM's SMCCC filter"):
            debugger.set_catches([(0x8400_0000, 0x8400_001F)])
        assert debugger.catches == []
        debugger.set_catches([])  # turning them off is fine
    finally:
        debugger.close()
        memory.close()


class SveVcpu(FakeVcpu):
    """A vCPU with 256-bit SVE vectors: KVM has no V registers then, only Z0-Z31 (2048 bits
    each, the bits past the vector length zero), P0-P15 and FFR (256 bits each)."""

    sve_vl = 256

    def __init__(self, index: int) -> None:
        super().__init__(index)
        self.wide: dict[int, bytes] = {sve_zreg_id(3): bytes(range(1, 33)) + bytes(224),
                                       sve_preg_id(2): b"\x11\x01\x10\x00" + bytes(28),
                                       KVM_REG_ARM64_SVE_FFR: b"\xff" * 4 + bytes(28)}

    def get_wide(self, reg_id: int, size: int) -> bytes:
        if reg_id in V_IDS:
            raise KvmIoctlError("KVM_GET_ONE_REG", errno.ENOENT)  # what KVM says with SVE on
        return self.wide.get(reg_id, bytes(size))

    def set_wide(self, reg_id: int, data: bytes) -> None:
        if reg_id in V_IDS:
            raise KvmIoctlError("KVM_SET_ONE_REG", errno.ENOENT)
        self.wide[reg_id] = data


def test_with_sve_gdb_gets_z_p_ffr_and_vg_as_long_as_the_vector() -> None:
    """GDB's SVE numbering (gdb/aarch64-tdep.h): z0-z31 follow cpsr, then fpsr, fpcr, p0-p15,
    ffr, vg; each Z register as long as the vector length, each P register an eighth of that."""
    vcpu = SveVcpu(0)
    target = MachineTarget([vcpu], GuestMemory())
    layout = target.layout
    assert [layout.number[n] for n in ("z0", "z31", "fpsr", "fpcr", "p0", "ffr", "vg")] == [34, 65, 66, 67, 68, 84, 85]
    assert layout.registers[layout.number["z3"]].bits == 256 and layout.registers[layout.number["p2"]].bits == 32
    values = target.read_registers(0)
    assert values[layout.number["z3"]] == int.from_bytes(bytes(range(1, 33)), "little")
    assert values[layout.number["p2"]] == 0x0010_0111 and values[layout.number["ffr"]] == 0xFFFF_FFFF
    assert values[layout.number["vg"]] == 4  # 256 bits: four 64-bit granules
    target.write_register(0, layout.number["z3"], 0xAB)
    assert vcpu.wide[sve_zreg_id(3)] == b"\xab" + bytes(255)
    target.write_register(0, layout.number["p15"], 0x8001)
    assert vcpu.wide[sve_preg_id(15)] == b"\x01\x80" + bytes(30)
    target.write_register(0, layout.number["vg"], 4)  # GDB's G writes every register back, vg too
    with pytest.raises(ValueError, match="vector length cannot change"):
        target.write_register(0, layout.number["vg"], 2)


def test_without_sve_gdb_gets_the_v_registers() -> None:
    vcpu = FakeVcpu(0)
    target = MachineTarget([vcpu], GuestMemory())
    assert target.layout is regs.FPSIMD and len(target.read_registers(0)) == 68
    assert target.layout.number["v0"] == 34 and target.layout.number["fpcr"] == 67

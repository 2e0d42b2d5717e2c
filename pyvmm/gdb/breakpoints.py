"""The breakpoints and watchpoints a debugger has set in the guest (GDB's Z and z packets).

Software breakpoints are BRK #0 written over the instruction (KVM_GUESTDBG_USE_SW_BP sends
every BRK to userspace, ESR class 0x3C); the original is kept, shown in memory reads and
written back when the breakpoint goes. Hardware breakpoints and watchpoints are debug registers
(pyvmm/gdb/hw.py), up to the number KVM reports. The debugger calls these with its lock held
and the guest stopped.
"""

from __future__ import annotations

from typing import NamedTuple

from pyvmm.gdb import hw
from pyvmm.gdb.commands import EINVAL
from pyvmm.gdb.target import MachineTarget

ENOSPC = 28
BRK = (0xD420_0000).to_bytes(4, "little")  # BRK #0 (Arm ARM C6.2.38)
HW_SLOTS = 16  # kvm_guest_debug_arch holds 16 of each
MAX_SW_BREAKPOINTS = 4096  # a client cannot grow the VMM without bound
WATCH_KINDS = {2: "write", 3: "read", 4: "access"}  # Z2, Z3, Z4


class Watchpoint(NamedTuple):
    address: int
    length: int
    kind: str
    slot: hw.Slot


class Breakpoints:
    def __init__(self, target: MachineTarget, hw_breakpoints: int, hw_watchpoints: int) -> None:
        self.target = target
        self.hw_breakpoints, self.hw_watchpoints = min(hw_breakpoints, HW_SLOTS), min(hw_watchpoints, HW_SLOTS)
        self.sw: dict[int, tuple[int, bytes]] = {}  # virtual address -> (physical address, original)
        self.hw: list[int] = []
        self.watchpoints: list[Watchpoint] = []

    def insert(self, kind: int, address: int, length: int, cpu: int) -> int:
        """Z<kind>: 0 on success, else an errno for the reply."""
        if kind == 0:
            if address not in self.sw and len(self.sw) >= MAX_SW_BREAKPOINTS:
                return ENOSPC
            if address not in self.sw:
                pa, _ = self.target.translate(cpu, address)
                if address & 3:
                    return EINVAL
                original = self.target.read_memory(cpu, address, 4)
                self.target.write_memory(cpu, address, BRK)
                self.sw[address] = (pa, original)
            return 0
        if kind == 1:
            if address in self.hw:
                return 0
            if len(self.hw) >= self.hw_breakpoints:
                return ENOSPC
            try:
                hw.breakpoint_slot(address)
            except ValueError:
                return EINVAL
            self.hw.append(address)
            return 0
        watch_kind = WATCH_KINDS[kind]
        if any(w.address == address and w.length == length and w.kind == watch_kind for w in self.watchpoints):
            return 0
        if len(self.watchpoints) >= self.hw_watchpoints:
            return ENOSPC
        try:
            slot = hw.watchpoint_slot(address, length, watch_kind)
        except ValueError:
            return EINVAL
        self.watchpoints.append(Watchpoint(address, length, watch_kind, slot))
        return 0

    def remove(self, kind: int, address: int, length: int) -> None:
        """z<kind>: removing what is not there is no error."""
        if kind == 0:
            if address in self.sw:
                self._remove_sw(address)
        elif kind == 1:
            if address in self.hw:
                self.hw.remove(address)
        else:
            self.watchpoints = [w for w in self.watchpoints
                                if (w.address, w.length, w.kind) != (address, length, WATCH_KINDS[kind])]

    def clear(self) -> None:
        for address in list(self.sw):
            self._remove_sw(address)
        self.hw.clear()
        self.watchpoints.clear()

    def _remove_sw(self, address: int) -> None:
        pa, original = self.sw.pop(address)
        mem = self.target.memory
        if mem.contains(pa, 4) and mem.read(pa, 4) == BRK:  # unless the guest rewrote it since
            mem.write(pa, original)

    def reinsert(self) -> None:
        """After a reset loaded the images again over the BRKs: the instructions they brought
        become the originals, and the BRKs go back."""
        mem = self.target.memory
        for address, (pa, _) in list(self.sw.items()):
            if mem.contains(pa, 4) and (current := mem.read(pa, 4)) != BRK:
                self.sw[address] = (pa, current)
                mem.write(pa, BRK)

    def registers(self) -> tuple[list[int], list[int], list[int], list[int]]:
        """The debug registers for KVM_SET_GUEST_DEBUG: breakpoint control and value, watchpoint
        control and value, HW_SLOTS of each."""
        pad = [hw.Slot(0, 0)] * HW_SLOTS
        bps = ([hw.breakpoint_slot(a) for a in self.hw] + pad)[:HW_SLOTS]
        wps = ([w.slot for w in self.watchpoints] + pad)[:HW_SLOTS]
        return [s.control for s in bps], [s.value for s in bps], [s.control for s in wps], [s.value for s in wps]

    def watchpoint_at(self, far: int) -> Watchpoint | None:
        """The watchpoint a data access at `far` hit: the one covering it, else (an access that
        starts below the watched bytes) the nearest."""
        hit = next((w for w in self.watchpoints if hw.covers(w.slot, far)), None)
        return hit or min(self.watchpoints, key=lambda w: abs(w.address - far), default=None)

    # --- guest memory as GDB sees it --------------------------------------------------------
    def shown(self, address: int, data: bytes) -> bytes:
        """Guest memory read at `address` with the instructions breakpoints replaced shown, not
        the BRKs."""
        out = bytearray(data)
        for bp, (_, original) in self.sw.items():
            for i in range(4):
                if address <= bp + i < address + len(out):
                    out[bp + i - address] = original[i]
        return bytes(out)

    def written(self, address: int, data: bytes) -> None:
        """After GDB wrote `data` at `address`: a write over a breakpoint changes the instruction
        it will restore; the BRK stays."""
        for bp, (pa, original) in list(self.sw.items()):
            if bp + 4 <= address or address + len(data) <= bp:
                continue
            changed = bytearray(original)
            for i in range(4):
                if address <= bp + i < address + len(data):
                    changed[i] = data[bp + i - address]
            self.sw[bp] = (pa, bytes(changed))
            self.target.memory.write(pa, BRK)

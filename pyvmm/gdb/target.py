"""The machine as GDB sees it: the registers of each vCPU in GDB's numbering, and memory at the
guest's virtual addresses, translated through the vCPU's own stage-1 tables.

It is handed the vCPUs' register access and guest RAM, nothing else. Every call is made while
the vCPUs are stopped (the debugger's all-stop), so no register moves under it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from kvm_bindings.regs import (
    KVM_REG_ARM64_SVE_FFR,
    KVM_REG_SIZE_U32,
    KVM_REG_SIZE_U128,
    SVE_PREG_SIZE,
    SVE_ZREG_SIZE,
    core_reg_id,
    sve_preg_id,
    sve_zreg_id,
)
from pyvmm.errors import GuestMemoryError
from pyvmm.gdb import registers as regs
from pyvmm.gdb.commands import MemoryFault
from pyvmm.gdb.stage1 import Regs, TranslationFault, translate

V_IDS = [core_reg_id(f"fp_regs.vregs[{2 * n}]", KVM_REG_SIZE_U128) for n in range(32)]
# With SVE, KVM has no V0-V31: they are the low 128 bits of Z0-Z31 (api.rst, KVM_REG_ARM64_SVE)
Z_IDS = [sve_zreg_id(n) for n in range(32)]
P_IDS = [sve_preg_id(n) for n in range(16)] + [KVM_REG_ARM64_SVE_FFR]  # P0-P15, then FFR
FPSR_ID = core_reg_id("fp_regs.fpsr", KVM_REG_SIZE_U32)
FPCR_ID = core_reg_id("fp_regs.fpcr", KVM_REG_SIZE_U32)
FIRST_VECTOR = regs.FIRST_VECTOR
FPSR, FPCR = FIRST_VECTOR + 32, FIRST_VECTOR + 33  # in both layouts
FIRST_P = FPCR + 1  # with SVE: p0..p15, ffr, then vg
VG = FIRST_P + len(P_IDS)
# PSTATE.M[3:0] (Arm ARM C5.2.19 SPSR_EL2): EL1h runs on SP_EL1; EL1t and EL0t on SP_EL0
M_EL1H = 0b0101


class DebugVcpu(Protocol):
    """A vCPU's registers as the debugger reads them (pyvmm.machine.vcpu.Vcpu is one)."""

    index: int
    sve_vl: int  # bits; non-zero: KVM gives its FP/SIMD registers only as SVE's Z registers

    def get_reg(self, name: str) -> int: ...

    def set_reg(self, name: str, value: int) -> None: ...

    def get_x(self, n: int) -> int: ...

    def set_x(self, n: int, value: int) -> None: ...

    def get_wide(self, reg_id: int, size: int) -> bytes: ...

    def set_wide(self, reg_id: int, data: bytes) -> None: ...


class GuestRam(Protocol):
    def read(self, gpa: int, size: int) -> bytes: ...

    def write(self, gpa: int, data: bytes) -> None: ...

    def contains(self, gpa: int, size: int = 1) -> bool: ...


def _read(v: DebugVcpu, reg_id: int, size: int, keep: int) -> int:
    """The first `keep` bytes of a `size`-byte register, as an integer (little-endian)."""
    return int.from_bytes(v.get_wide(reg_id, size)[:keep], "little")


def _sp_name(pstate: int) -> str:
    """The KVM register behind GDB's sp: the stack pointer the vCPU is using now."""
    return "sp_el1" if pstate & 0xF == M_EL1H else "sp"


def layout_of(vcpu: DebugVcpu) -> regs.Layout:
    return regs.sve(vcpu.sve_vl // 128) if vcpu.sve_vl else regs.FPSIMD


class MachineTarget:
    def __init__(self, vcpus: Sequence[DebugVcpu], memory: GuestRam) -> None:
        self._vcpus, self.memory = vcpus, memory
        self.layout = layout_of(vcpus[0])  # every vCPU of a VM has the same features

    def vcpus(self) -> int:
        return len(self._vcpus)

    # --- registers ---------------------------------------------------------------------------
    def read_registers(self, cpu: int) -> list[int]:
        v = self._vcpus[cpu]
        pstate = v.get_reg("pstate")
        values = [v.get_x(n) for n in range(31)]
        values += [v.get_reg(_sp_name(pstate)), v.get_reg("pc"), pstate & 0xFFFF_FFFF]
        vq = self.layout.vq
        if vq:  # KVM's registers are the architecture's longest; the bytes past the VL are zero
            values += [_read(v, Z_IDS[n], SVE_ZREG_SIZE, 16 * vq) for n in range(32)]
        else:
            values += [_read(v, V_IDS[n], 16, 16) for n in range(32)]
        values += [_read(v, FPSR_ID, 4, 4), _read(v, FPCR_ID, 4, 4)]
        if vq:
            values += [_read(v, reg_id, SVE_PREG_SIZE, 2 * vq) for reg_id in P_IDS] + [2 * vq]
        return values

    def write_register(self, cpu: int, number: int, value: int) -> None:
        v, vq = self._vcpus[cpu], self.layout.vq
        if number < 31:
            v.set_x(number, value)
        elif number == regs.SP:
            v.set_reg(_sp_name(v.get_reg("pstate")), value)
        elif number == regs.PC:
            v.set_reg("pc", value)
        elif number == regs.CPSR:
            v.set_reg("pstate", value & 0xFFFF_FFFF)
        elif FIRST_VECTOR <= number < FPSR:
            n = number - FIRST_VECTOR
            if vq:
                v.set_wide(Z_IDS[n], value.to_bytes(SVE_ZREG_SIZE, "little"))
            else:
                v.set_wide(V_IDS[n], value.to_bytes(16, "little"))
        elif number in (FPSR, FPCR):
            v.set_wide(FPSR_ID if number == FPSR else FPCR_ID, value.to_bytes(4, "little"))
        elif vq and FIRST_P <= number < VG:
            v.set_wide(P_IDS[number - FIRST_P], value.to_bytes(SVE_PREG_SIZE, "little"))
        elif vq and number == VG:
            if value != 2 * vq:  # fixed when the vCPU was made (KVM_ARM_VCPU_FINALIZE)
                raise ValueError(f"vg is {2 * vq}: the vector length cannot change")
        else:
            raise IndexError(number)

    def read_pc(self, cpu: int) -> int:
        return self._vcpus[cpu].get_reg("pc")

    def write_pc(self, cpu: int, value: int) -> None:
        self._vcpus[cpu].set_reg("pc", value)

    # --- memory ------------------------------------------------------------------------------
    def translate(self, cpu: int, address: int) -> tuple[int, int]:
        """(guest physical address, bytes up to the end of its mapping) for virtual `address`."""
        v = self._vcpus[cpu]
        mmu = Regs(v.get_reg("sctlr_el1"), v.get_reg("tcr_el1"), v.get_reg("ttbr0_el1"), v.get_reg("ttbr1_el1"))
        try:
            t = translate(address, mmu, self._read_u64)
        except TranslationFault as e:
            raise MemoryFault(str(e)) from None
        return t.pa, t.size - (address & (t.size - 1))

    def _read_u64(self, gpa: int) -> int:
        return int.from_bytes(self.memory.read(gpa, 8), "little")

    def _pieces(self, cpu: int, address: int, length: int) -> list[tuple[int, int, int]]:
        """The span as (offset in it, guest physical address, length) pieces, one per mapping."""
        pieces, done = [], 0
        while done < length:
            pa, room = self.translate(cpu, (address + done) & 0xFFFF_FFFF_FFFF_FFFF)
            n = min(room, length - done)
            pieces.append((done, pa, n))
            done += n
        return pieces

    def read_memory(self, cpu: int, address: int, length: int) -> bytes:
        out = bytearray()
        for _, pa, n in self._pieces(cpu, address, length):
            try:
                out += self.memory.read(pa, n)
            except GuestMemoryError:  # a device's registers are not read behind its back
                raise MemoryFault(f"{address:#x} maps to {pa:#x}, which is not guest RAM") from None
        return bytes(out)

    def write_memory(self, cpu: int, address: int, data: bytes) -> None:
        pieces = self._pieces(cpu, address, len(data))
        for _, pa, n in pieces:  # all or nothing: every piece is checked before any is written
            if not self.memory.contains(pa, n):
                raise MemoryFault(f"{address:#x} maps to {pa:#x}, which is not guest RAM")
        for offset, pa, n in pieces:
            self.memory.write(pa, data[offset:offset + n])

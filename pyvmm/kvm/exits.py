"""kvm_run decoded, in one place: the vCPU loop's fast accessors and small immutable values.

The two exits a guest causes most are read without building anything: a forwarded SMCCC call
(KVM_EXIT_HYPERCALL) as its function ID and flags at HYPERCALL_NR and HYPERCALL_FLAGS, which the
SMCCC dispatcher takes as they are (smccc/call.py reads the flags), and an MMIO access with
decode_mmio straight from the mmap. Every other exit is `decode`d into its typed value, a pure
function of the kvm_run contents (tests feed it a struct built with cffi).
"""

from __future__ import annotations

import mmap
import struct
from typing import NamedTuple

from kvm_bindings import CData, ffi
from kvm_bindings.constants import ExitReason, SystemEvent


class MmioExit(NamedTuple):
    """KVM_EXIT_MMIO: a load/store to guest-physical memory no memslot backs."""

    addr: int
    size: int
    is_write: bool
    data: int  # the value stored (little-endian, `size` bytes); 0 for a load


class SystemEventExit(NamedTuple):
    """KVM_EXIT_SYSTEM_EVENT: PSCI SYSTEM_OFF/RESET/... handled by KVM, or a crash/suspend."""

    type: int
    data: tuple[int, ...]

    @property
    def name(self) -> str:
        try:
            return SystemEvent(self.type).name.lower()
        except ValueError:
            return f"event {self.type}"


class InterruptedExit(NamedTuple):
    """KVM_RUN returned EINTR/EAGAIN (a kick) or KVM_EXIT_INTR."""


class NisvExit(NamedTuple):
    """KVM_EXIT_ARM_NISV: a data abort on MMIO without valid syndrome (e.g. LDP, writeback)."""

    esr_iss: int
    fault_ipa: int


# ESR_EL2.EC of the debug exceptions KVM hands userspace as KVM_EXIT_DEBUG (Arm ARM D19.2.37,
# ESR_ELx; arch/arm64/kvm/handle_exit.c, kvm_handle_guest_debug). Lower EL and same EL differ
# only in who took it: a guest's EL1 is "lower" to KVM's EL2.
EC_KINDS = {0x30: "hw-breakpoint", 0x31: "hw-breakpoint", 0x32: "step", 0x33: "step",
            0x34: "watchpoint", 0x35: "watchpoint", 0x3C: "breakpoint"}
ESR_EC_SHIFT = 26
ESR_WNR = 1 << 6  # a watchpoint's ISS: the access was a write


class DebugExit(NamedTuple):
    """KVM_EXIT_DEBUG: a guest-debug event (KVM_SET_GUEST_DEBUG enabled it) — a BRK, a hardware
    breakpoint or watchpoint, or a completed single step. `far` holds the data address for a
    watchpoint only."""

    esr: int
    far: int

    @property
    def kind(self) -> str:
        """breakpoint (BRK), hw-breakpoint, watchpoint, step, or unknown."""
        return EC_KINDS.get((self.esr >> ESR_EC_SHIFT) & 0x3F, "unknown")

    @property
    def write(self) -> bool:
        """For a watchpoint: the access was a store."""
        return bool(self.esr & ESR_WNR)


class FailEntryExit(NamedTuple):
    reason: int
    cpu: int


class InternalErrorExit(NamedTuple):
    suberror: int
    data: tuple[int, ...]


class UnknownExit(NamedTuple):
    reason: int


Exit = (MmioExit | SystemEventExit | InterruptedExit | NisvExit | DebugExit | FailEntryExit
        | InternalErrorExit | UnknownExit)

_MMIO_EXIT = ExitReason.MMIO.value
_HYPERCALL = ExitReason.HYPERCALL.value
INTERRUPTED = InterruptedExit()


def _index(offset: int, size: int) -> int:
    if offset % size:
        raise RuntimeError(f"kvm_run field at {offset} is not {size}-byte aligned")  # never on Linux's layout
    return offset // size


# The exit loop's fast path reads these straight from VcpuFd.run_words (u32) and run_quads (u64),
# at the offsets cffi computes from the kvm_run declaration (8, 32 and 96 on Linux 6.12):
REASON = _index(ffi.offsetof("struct kvm_run", "exit_reason"), 4)
"""run_words[REASON]: kvm_run.exit_reason."""
HYPERCALL_NR = _index(ffi.offsetof("struct kvm_run", "hypercall", "nr"), 8)
"""run_quads[HYPERCALL_NR]: the forwarded call's function ID (KVM_EXIT_HYPERCALL only)."""
HYPERCALL_FLAGS = _index(ffi.offsetof("struct kvm_run", "hypercall", "flags"), 8)
"""run_quads[HYPERCALL_FLAGS]: its KVM_HYPERCALL_EXIT_* flags (KVM_EXIT_HYPERCALL only)."""

# A 32-bit load from a hot register (MmioBus.hot_reads) is answered from these, without decoding:
MMIO_ADDR = _index(ffi.offsetof("struct kvm_run", "mmio", "phys_addr"), 8)
"""run_quads[MMIO_ADDR]: kvm_run.mmio.phys_addr (KVM_EXIT_MMIO only)."""
MMIO_DATA = _index(ffi.offsetof("struct kvm_run", "mmio", "data"), 8)
"""run_quads[MMIO_DATA]: kvm_run.mmio.data, where a load's result goes."""
MMIO_LEN = _index(ffi.offsetof("struct kvm_run", "mmio", "len"), 4)
"""run_words[MMIO_LEN]: kvm_run.mmio.len."""
MMIO_IS_WRITE = _index(ffi.offsetof("struct kvm_run", "mmio", "is_write"), 4)
"""run_words[MMIO_IS_WRITE] & 0xFF: kvm_run.mmio.is_write (a u8; the bytes after it are padding)."""

# kvm_run.mmio: phys_addr, data[8], len, is_write, unpacked in one go from the mmap (virtio
# interrupt acknowledgements and UART traffic make MMIO the second most frequent exit)
_MMIO_OFFSET = ffi.offsetof("struct kvm_run", "mmio", "phys_addr")
_MMIO_DATA = ffi.offsetof("struct kvm_run", "mmio", "data")
_MMIO = struct.Struct("<Q8sIB")
_U64 = struct.Struct("<Q")
Buffer = mmap.mmap | bytearray | memoryview  # the kvm_run mapping, or a copy of it (tests)


def decode_mmio(buf: Buffer) -> MmioExit:
    """KVM_EXIT_MMIO from the kvm_run mmap (or ffi.buffer of it), without cffi attribute access."""
    addr, data, size, is_write = _MMIO.unpack_from(buf, _MMIO_OFFSET)
    value = int.from_bytes(data[:size], "little") if is_write and 0 < size <= 8 else 0
    return MmioExit(addr, size, bool(is_write), value)


def complete_mmio_read(buf: Buffer, value: int, size: int) -> None:
    """Write a load's result into kvm_run.mmio.data (`buf`: the kvm_run mmap); KVM finishes the
    load on re-entry."""
    _U64.pack_into(buf, _MMIO_DATA, value & ((1 << (8 * size)) - 1) if 0 < size <= 8 else 0)


def decode(run: CData) -> Exit:
    """Decode a `struct kvm_run *` (cffi cdata) after KVM_RUN returned 0."""
    reason = run.exit_reason
    if reason == _MMIO_EXIT:
        return decode_mmio(ffi.buffer(run))
    if reason == ExitReason.SYSTEM_EVENT:
        ev = run.system_event
        return SystemEventExit(ev.type, tuple(ev.data[0:min(ev.ndata, 16)]))
    if reason == ExitReason.INTR:
        return INTERRUPTED
    if reason == ExitReason.ARM_NISV:
        return NisvExit(run.arm_nisv.esr_iss, run.arm_nisv.fault_ipa)
    if reason == ExitReason.DEBUG:
        arch = run.debug.arch
        return DebugExit(arch.hsr, arch.far)
    if reason == ExitReason.FAIL_ENTRY:
        fe = run.fail_entry
        return FailEntryExit(fe.hardware_entry_failure_reason, fe.cpu)
    if reason == ExitReason.INTERNAL_ERROR:
        ie = run.internal
        return InternalErrorExit(ie.suberror, tuple(ie.data[0:min(ie.ndata, 16)]))
    return UnknownExit(reason)

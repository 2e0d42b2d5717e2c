"""Entering an SDEI handler in the guest and leaving it (Arm DEN0054B §6.3, §6.5, §5.1.4-5.1.6).

The register work only, always on the target vCPU's own thread with its state consistent: at
dispatch x0-x17, PC and PSTATE are saved and the handler is entered at EL1h with DAIF masked,
x0 = event, x1 = registered argument, x2 = interrupted PC, x3 = interrupted PSTATE; EVENT_COMPLETE
restores the saved context; EVENT_COMPLETE_AND_RESUME restores x0-x17 and enters the resume
address as if an IRQ had been taken at the interrupted instruction (ELR_EL1/SPSR_EL1 = the
interrupted PC/PSTATE). arm64 KVM has no KVM_GET_REGS, so each register is one ioctl.
"""

from __future__ import annotations

from kvm_bindings.regs import CORE_REGS, SYS_REGS
from pyvmm.services.sdei.events import CONTEXT_REGS, Registration
from pyvmm.smccc.context import ServiceVcpu

# PSTATE (Arm ARM C5.2.19) and SCTLR_EL1 bits used to enter a handler as an exception would
_NZCV = 0xF << 28
_DIT, _PAN, _SSBS, _NRW = 1 << 24, 1 << 22, 1 << 12, 1 << 4
_DAIF_EL1H = 0x3C5  # D, A, I, F masked; M = EL1h
_SCTLR_SPAN, _SCTLR_DSSBS = 1 << 23, 1 << 44

_X = tuple(CORE_REGS[f"x{n}"] for n in range(CONTEXT_REGS))
_PC, _PSTATE = CORE_REGS["pc"], CORE_REGS["pstate"]
_ELR_EL1, _SPSR_EL1 = CORE_REGS["elr_el1"], CORE_REGS["spsr_el1"]
_SCTLR_EL1 = SYS_REGS["sctlr_el1"]


def exception_pstate(interrupted: int, sctlr: int) -> int:
    """PSTATE on taking an exception to EL1h from `interrupted` (Arm ARM D1.3.1, the pseudocode
    AArch64.TakeException): NZCV kept, DAIF set, SS/IL/BTYPE/UAO cleared, PAN set unless
    SCTLR_EL1.SPAN, SSBS = SCTLR_EL1.DSSBS, DIT kept from an AArch64 context."""
    keep = _NZCV | _PAN | (0 if interrupted & _NRW else _DIT)
    new = (interrupted & keep) | _DAIF_EL1H
    if not sctlr & _SCTLR_SPAN:
        new |= _PAN
    if sctlr & _SCTLR_DSSBS:
        new |= _SSBS
    return new


class Frame:
    """A running handler on a PE and the context it interrupted."""

    __slots__ = ("reg", "x", "pc", "pstate")

    def __init__(self, reg: Registration) -> None:
        self.reg = reg
        self.x: tuple[int, ...] = ()
        self.pc = self.pstate = 0


class Pe:
    """A PE's SDEI state: masked or not, its private events, its running handlers (innermost
    last: at most a normal one and a critical one preempting it)."""

    __slots__ = ("index", "masked", "private", "frames", "poked")

    def __init__(self, index: int, private: dict[int, Registration]) -> None:
        self.index = index
        self.masked = True  # every PE starts masked (§6.2)
        self.private = private
        self.frames: list[Frame] = []
        self.poked = False  # a delivery check is queued on the vCPU's thread


def enter_handler(vcpu: ServiceVcpu, frame: Frame, number: int, entry: int, arg: int) -> None:
    """Save the interrupted context in `frame` and enter the handler (27 register ioctls)."""
    get, put = vcpu.get_one_reg, vcpu.set_one_reg
    vcpu.leave_standby()  # a PE in standby (PSCI CPU_SUSPEND) is woken by the event
    frame.x = tuple([get(r) for r in _X])
    frame.pc, frame.pstate = get(_PC), get(_PSTATE)
    pstate = exception_pstate(frame.pstate, get(_SCTLR_EL1))
    for reg_id, value in ((_X[0], number), (_X[1], arg), (_X[2], frame.pc), (_X[3], frame.pstate),
                          (_PC, entry), (_PSTATE, pstate)):
        put(reg_id, value)


def leave_handler(vcpu: ServiceVcpu, frame: Frame, resume: int | None) -> None:
    """EVENT_COMPLETE (resume None: back to the interrupted context, 20 ioctls) or
    EVENT_COMPLETE_AND_RESUME at `resume`."""
    put = vcpu.set_one_reg
    for n in range(CONTEXT_REGS):
        put(_X[n], frame.x[n])
    if resume is None:
        put(_PC, frame.pc)
        put(_PSTATE, frame.pstate)
    else:
        put(_ELR_EL1, frame.pc)
        put(_SPSR_EL1, frame.pstate)
        put(_PSTATE, exception_pstate(frame.pstate, vcpu.get_one_reg(_SCTLR_EL1)))
        put(_PC, resume)

"""A vCPU: its fd, registers by name, its power state, and the thread that runs KVM_RUN.

Power (PSCI 1.1 §5.7.1, AFFINITY_INFO states): a vCPU is ON, OFF or ON_PENDING. Only vCPU 0
starts ON; the others wait, outside KVM_RUN, until a PSCI CPU_ON makes them ON_PENDING. The
target's own thread then resets it (KVM_ARM_VCPU_INIT), sets the entry point and context ID,
becomes ON and enters the guest. CPU_OFF sends a vCPU's thread back to waiting.

Stopping a vCPU at any moment (Documentation/virt/kvm/api.rst, "immediate_exit"): the stopper
sets kvm_run.immediate_exit and sends the vCPU thread a signal. A thread already inside KVM_RUN
is interrupted by the signal (EINTR); one about to enter sees immediate_exit and returns EINTR at
once. Either way the loop regains control, so no guest can hold a vCPU thread hostage.
"""

from __future__ import annotations

import signal
import threading
from collections import deque
from collections.abc import Callable
from enum import IntEnum
from typing import TYPE_CHECKING

from kvm_bindings.constants import ExitReason
from kvm_bindings.regs import CORE_REGS, SYS_REGS, sysreg_id
from pyvmm.exits import HEAD, decode, decode_mmio
from pyvmm.kvm import VcpuFd

if TYPE_CHECKING:
    from pyvmm.vm import Vm

KICK_SIGNAL = signal.SIGRTMIN + 2
_X = tuple(CORE_REGS[f"x{n}"] for n in range(31))
_HYPERCALL = ExitReason.HYPERCALL.value
_MMIO = ExitReason.MMIO.value
_kick_handler_installed = False


def install_kick_handler() -> None:
    """The kick signal needs a handler (not SIG_IGN/SIG_DFL) to interrupt KVM_RUN with EINTR.
    Python only lets the main thread install handlers, so the first VM must be made there."""
    global _kick_handler_installed
    if _kick_handler_installed:
        return
    if threading.current_thread() is not threading.main_thread():
        from pyvmm.errors import VmmError

        raise VmmError("create the first VM from the main thread (pyvmm installs its vCPU kick signal handler)")
    signal.signal(KICK_SIGNAL, lambda signum, frame: None)
    _kick_handler_installed = True


class Power(IntEnum):
    """Values as AFFINITY_INFO returns them (PSCI 1.1 §5.7.1)."""

    ON = 0
    OFF = 1
    ON_PENDING = 2


class Vcpu:
    def __init__(self, vm: Vm, index: int, fd: VcpuFd) -> None:
        self.vm = vm
        self.index = index
        self.fd = fd
        self.thread: threading.Thread | None = None
        self._stop = False
        self._requests: deque[Callable[[Vcpu], None]] = deque()
        # power state, guarded by vm.power_lock; _power_on: (entry, context ID) of a pending CPU_ON
        self.power = Power.OFF
        self._power_on: tuple[int, int] | None = None
        self._woken = threading.Condition(vm.power_lock)
        self.resume_at: tuple[int, int] | None = None  # power-down suspend: (entry, context ID)
        self.suspended = False  # in KVM_MP_STATE_SUSPENDED (PSCI CPU_SUSPEND / SYSTEM_SUSPEND)
        self.mpidr = 0  # MPIDR_EL1, read once the vCPU is initialised

    # --- registers -------------------------------------------------------------------------
    def get_reg(self, name: str) -> int:
        """x0-x30, sp, pc, pstate, sp_el1, elr_el1, spsr_el1, or a system register name."""
        return self.fd.get_one_reg(_reg_id(name))

    def set_reg(self, name: str, value: int) -> None:
        self.fd.set_one_reg(_reg_id(name), value)

    def get_x(self, n: int) -> int:
        return self.fd.get_one_reg(_X[n])

    def set_x(self, n: int, value: int) -> None:
        self.fd.set_one_reg(_X[n], value)

    def get_sysreg(self, op0: int, op1: int, crn: int, crm: int, op2: int) -> int:
        return self.fd.get_one_reg(sysreg_id(op0, op1, crn, crm, op2))

    def set_sysreg(self, op0: int, op1: int, crn: int, crm: int, op2: int, value: int) -> None:
        self.fd.set_one_reg(sysreg_id(op0, op1, crn, crm, op2), value)

    # --- power -----------------------------------------------------------------------------
    def power_on(self, entry: int, context_id: int) -> None:
        """Make an OFF vCPU ON_PENDING; its thread will boot it at `entry` (vm.power_lock held)."""
        self.power = Power.ON_PENDING
        self._power_on = (entry, context_id)
        self._woken.notify_all()

    def power_off(self) -> None:
        """Called on this vCPU's own thread (PSCI CPU_OFF): leave the guest and wait for CPU_ON."""
        with self.vm.power_lock:
            self.power = Power.OFF
            self._power_on = None
        self.fd.run_struct.immediate_exit = 1  # the next KVM_RUN returns at once; the loop sees OFF
        self.vm.check_all_off()

    def leave_guest(self) -> None:
        """Called on this vCPU's own thread: do not re-enter the guest (the run is ending)."""
        self._stop = True
        self.fd.run_struct.immediate_exit = 1

    # --- the run loop ----------------------------------------------------------------------
    def start(self) -> None:
        self._stop = False
        self.fd.run_struct.immediate_exit = 0
        self.thread = threading.Thread(target=self._thread_main, name=f"vcpu{self.index}", daemon=True)
        self.thread.start()

    def kick(self) -> None:
        """Force the vCPU out of KVM_RUN (or keep it from entering) so the loop looks at its flags."""
        self.fd.run_struct.immediate_exit = 1
        t = self.thread
        if t is not None and t.ident is not None and t.is_alive():
            try:
                signal.pthread_kill(t.ident, KICK_SIGNAL)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        self._stop = True
        self.kick()
        with self.vm.power_lock:
            self._woken.notify_all()

    def request(self, fn: Callable[[Vcpu], None]) -> None:
        """Run `fn(vcpu)` on this vCPU's thread at its next exit (kicking it out of the guest)."""
        self._requests.append(fn)
        self.kick()

    def defer(self, fn: Callable[[Vcpu], None]) -> None:
        """On this vCPU's own thread: run `fn(vcpu)` once the current exit has been answered and
        before the guest runs again. After a hypercall that is right away; after any other exit
        an immediate-exit KVM_RUN first lets KVM finish it (an MMIO load's register write)."""
        self._requests.append(fn)

    def _thread_main(self) -> None:
        try:
            while self._wait_until_on():
                self._loop()
        except BaseException as e:  # noqa: BLE001 - any failure ends the run with its message
            self.vm.fail(self, e)

    def _wait_until_on(self) -> bool:
        """Wait while OFF; boot a pending CPU_ON. False when the vCPU is to stop."""
        with self.vm.power_lock:
            while self.power == Power.OFF and not self._stop:
                self._woken.wait()
            if self._stop:
                return False
            pending = self._power_on if self.power == Power.ON_PENDING else None
        if pending is not None:
            hook = self.vm.before_power_on
            if hook is not None:
                hook(self)
            self.vm.smccc.power_on(self)  # services' per-PE state starts over (SDEI)
            self.vm.boot_vcpu(self, *pending)  # KVM_ARM_VCPU_INIT, entry point, context ID
            with self.vm.power_lock:
                if self.power == Power.ON_PENDING:
                    self.power = Power.ON
                    self._power_on = None
        return True

    def _loop(self) -> None:
        """KVM_RUN until told to stop. Hypercalls take the fast path straight from the exit header;
        every other exit is decoded into its typed value first."""
        fd = self.fd
        run, buf = fd.run_struct, fd.mmap
        kvm_run, failed = fd.run, fd.failed
        head = HEAD.unpack_from
        vm = self.vm
        dispatch = vm.smccc.dispatch
        handle_mmio = vm.handle_mmio
        handle_exit = vm.handle_exit
        requests = self._requests
        while True:
            if kvm_run() and failed("KVM_RUN"):  # kicked: clear immediate_exit first, then the flags
                run.immediate_exit = 0
                while requests:
                    requests.popleft()(self)
                if self._stop or self.power != Power.ON:
                    return
                continue
            reason, nr, flags = head(buf)
            if reason == _HYPERCALL:
                dispatch(self, nr, flags)
                while requests:  # KVM has nothing left to complete for a hypercall
                    requests.popleft()(self)
                continue
            if reason == _MMIO:
                handle_mmio(self, decode_mmio(buf))
            elif not handle_exit(self, decode(run)):
                return
            if requests:
                run.immediate_exit = 1  # KVM completes the exit, returns EINTR, then they run


def _reg_id(name: str) -> int:
    key = name.lower()
    reg = CORE_REGS.get(key)
    if reg is None:
        reg = SYS_REGS.get(key)
        if reg is None:
            raise KeyError(f"unknown register {name!r}")
    return reg

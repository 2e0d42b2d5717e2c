"""A vCPU: its fd, registers by name, its power state, and the thread that runs its exit loop.

Power (PSCI 1.1 §5.7.1): the vCPU owns its PowerState; PSCI and the machine ask it for
transitions (request_on, power_off, suspend, reset) and never assign its fields. Only vCPU 0
starts ON; the others wait, outside KVM_RUN, until a CPU_ON makes them ON_PENDING. The vCPU's own
thread then boots it (KVM_ARM_VCPU_INIT, entry point, context ID), marks it ON and enters the guest.

With KVM's in-kernel PSCI (`kvm_power`: pyvmm does not serve PSCI) the power state is KVM's
instead, as in kvmtool: every thread enters KVM_RUN from the start, and a secondary initialised
with KVM_ARM_VCPU_POWER_OFF waits inside it until the guest's CPU_ON, which KVM answers
(arch/arm64/kvm/psci.c, kvm_psci_vcpu_on). Its PowerState then only ever says ON: a thread that
runs the vCPU.

Stopping a vCPU at any moment (Documentation/virt/kvm/api.rst, "immediate_exit"): the stopper
sets kvm_run.immediate_exit and sends the vCPU thread a signal. A thread already inside KVM_RUN
is interrupted by the signal (EINTR); one about to enter sees immediate_exit and returns EINTR at
once. Either way the loop regains control, so no guest can hold a vCPU thread hostage. Work
queued with request() while the thread is not running keeps immediate_exit set, so it runs as
soon as the thread starts, before the guest does.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Protocol

from kvm_bindings.constants import (
    KVM_ARM_VCPU_PMU_V3_CTRL,
    KVM_ARM_VCPU_PMU_V3_INIT,
    KVM_ARM_VCPU_PMU_V3_IRQ,
    KVM_ARM_VCPU_PVTIME_CTRL,
    KVM_ARM_VCPU_PVTIME_IPA,
    ExitReason,
    MpState,
    SystemEvent,
    VcpuFeature,
)
from kvm_bindings.regs import (
    CORE_REGS,
    KVM_REG_ARM64_SVE_VLS,
    KVM_REG_ARM_STD_BIT_TRNG_V1_0,
    KVM_REG_ARM_STD_BMAP,
    KVM_REG_ARM_STD_HYP_BIT_PV_TIME,
    KVM_REG_ARM_STD_HYP_BMAP,
    PSTATE_AA32_T,
    PSTATE_BOOT,
    PSTATE_BOOT_AA32,
    SVE_VLS_SIZE,
    SYS_REGS,
    sysreg_id,
)
from pyvmm.errors import KvmIoctlError
from pyvmm.kvm.exits import (
    HYPERCALL_FLAGS,
    HYPERCALL_NR,
    MMIO_ADDR,
    MMIO_DATA,
    MMIO_IS_WRITE,
    MMIO_LEN,
    REASON,
    DebugExit,
    Exit,
    MmioExit,
    SystemEventExit,
    decode,
    decode_mmio,
)
from pyvmm.kvm.fds import VcpuFd
from pyvmm.machine.cpu_features import (
    NO_FEATURES,
    PMU_PPI,
    PVTIME_BASE,
    PVTIME_STRUCT_SIZE,
    CpuFeatures,
    limit_vector_lengths,
    longest_vector,
)
from pyvmm.machine.kick import KICK_SIGNAL
from pyvmm.machine.power import Entry, Power, PowerState

_X = tuple(CORE_REGS[f"x{n}"] for n in range(31))
_HYPERCALL = ExitReason.HYPERCALL.value
_MMIO = ExitReason.MMIO.value
class ExitHandler(Protocol):
    """What a vCPU's exit loop hands exits to (the machine's devices, services and life cycle)."""

    @property
    def hypercall(self) -> Callable[[Vcpu, int, int], int | None]:
        """The hot path, fetched once (the SMCCC dispatcher runs with no frame in between): called
        with (vCPU, function ID, KVM_HYPERCALL_EXIT_* flags), it returns x0 for the loop to write."""

    @property
    def hot_reads(self) -> Mapping[int, Callable[[], int]]:
        """Registers the loop answers itself, by guest-physical address: a 32-bit load from one
        gets the function's value (pyvmm.devices.bus.MmioBus.add_hot_register)."""

    def mmio(self, vcpu: Vcpu, ex: MmioExit) -> None: ...

    def system_event(self, vcpu: Vcpu, ex: SystemEventExit) -> bool: ...

    def debug(self, vcpu: Vcpu, ex: DebugExit) -> None: ...

    def other(self, vcpu: Vcpu, ex: Exit) -> None: ...

    def booting(self, vcpu: Vcpu) -> None: ...

    def woken(self, vcpu: Vcpu) -> None: ...

    def turned_off(self, vcpu: Vcpu) -> None: ...

    def failed(self, vcpu: Vcpu, error: BaseException) -> None: ...


class Vcpu:
    def __init__(self, index: int, fd: VcpuFd, target: int, exits: ExitHandler, *, aarch32: bool = False,
                 kvm_power: bool = False, features: CpuFeatures = NO_FEATURES) -> None:
        self.index = index
        self.features = features  # KVM_ARM_VCPU_INIT takes the same ones every time
        self.sve_vl = 0  # bits: the longest SVE vector this vCPU has (set once SVE is finalized)
        self.kvm_power = kvm_power  # KVM's in-kernel PSCI owns the power state (see above)
        self.fd = fd
        self._target = target
        self.aarch32 = aarch32  # EL1 (so every SMCCC caller) in AArch32 state: KVM_ARM_VCPU_EL1_32BIT
        self._exits = exits
        self.thread: threading.Thread | None = None
        self._stop = False
        self._requests: deque[Callable[[Vcpu], None]] = deque()
        self._power = PowerState(on=self._thread_starts_on)
        self._resume_at: Entry | None = None  # power-down suspend: where the vCPU wakes
        self._suspended = False  # in KVM_MP_STATE_SUSPENDED (PSCI CPU_SUSPEND / SYSTEM_SUSPEND)
        # the exit path's register access, without an attribute lookup through fd
        self.get_one_reg = fd.get_one_reg
        self.set_one_reg = fd.set_one_reg
        self.set_x0 = fd.set_x0
        self.get_x: Callable[[int], int] = fd.get_x  # x<n>: a forwarded call's arguments
        self.kvm_run = fd.mmap  # where an MMIO load's result goes (exits.complete_mmio_read)
        self.init(powered_off=index > 0)
        self._configure_features()
        self.mpidr = self.get_reg("mpidr_el1")  # fixed by KVM from the vCPU index

    @property
    def _thread_starts_on(self) -> bool:
        """vCPU 0 runs from the start; so does every vCPU whose power KVM keeps (it waits in KVM_RUN)."""
        return self.index == 0 or self.kvm_power

    # --- registers -------------------------------------------------------------------------
    def get_reg(self, name: str) -> int:
        """x0-x30, sp, pc, pstate, sp_el1, elr_el1, spsr_el1, or a system register name."""
        return self.fd.get_one_reg(_reg_id(name))

    def set_reg(self, name: str, value: int) -> None:
        self.fd.set_one_reg(_reg_id(name), value)

    def set_x(self, n: int, value: int) -> None:
        self.fd.set_one_reg(_X[n], value)

    def get_wide(self, reg_id: int, size: int) -> bytes:
        """A register of `size` bytes other than 8 (the FP/SIMD V0-V31, FPSR, FPCR), little-endian."""
        return self.fd.get_one_reg_bytes(reg_id, size)

    def set_wide(self, reg_id: int, data: bytes) -> None:
        self.fd.set_one_reg_bytes(reg_id, data)

    def set_guest_debug(self, control: int, bcr: list[int], bvr: list[int], wcr: list[int], wvr: list[int]) -> None:
        """KVM_SET_GUEST_DEBUG (pyvmm/gdb/debugger.py sets it while the vCPU is out of the guest)."""
        self.fd.set_guest_debug(control, bcr, bvr, wcr, wvr)

    def get_sysreg(self, op0: int, op1: int, crn: int, crm: int, op2: int) -> int:
        return self.fd.get_one_reg(sysreg_id(op0, op1, crn, crm, op2))

    def kvm_offers_trng(self) -> bool:
        """Whether KVM answers the TRNG calls itself (its KVM_REG_ARM_STD_BMAP firmware register,
        Linux >= 6.0; older kernels have no such register: no TRNG of KVM's is counted)."""
        try:
            return bool(self.fd.get_one_reg(KVM_REG_ARM_STD_BMAP) & KVM_REG_ARM_STD_BIT_TRNG_V1_0)
        except KvmIoctlError:
            return False

    # --- reset and boot --------------------------------------------------------------------
    def init(self, *, powered_off: bool) -> None:
        """KVM_ARM_VCPU_INIT with the preferred target: PSCI 0.2+ (KVM's own PSCI, when it
        answers), secondaries powered off. Also a full reset of the vCPU's registers."""
        features = 1 << VcpuFeature.PSCI_0_2 | self.features.init_bits()
        if self.aarch32:
            features |= 1 << VcpuFeature.EL1_32BIT
        if powered_off:
            features |= 1 << VcpuFeature.POWER_OFF
        self.fd.vcpu_init(self._target, [features, 0, 0, 0, 0, 0, 0])

    def _configure_features(self) -> None:
        """What the first KVM_ARM_VCPU_INIT leaves to set, once, before the vCPU first runs (in
        cpu_features.py's order); later inits keep it."""
        if self.features.pvtime:
            ipa = PVTIME_BASE + PVTIME_STRUCT_SIZE * self.index
            self.fd.set_device_attr_u64(KVM_ARM_VCPU_PVTIME_CTRL, KVM_ARM_VCPU_PVTIME_IPA, ipa, f"PV time at {ipa:#x}")
        if self.features.sve:
            vls = self.fd.get_one_reg_bytes(KVM_REG_ARM64_SVE_VLS, SVE_VLS_SIZE)
            if self.features.sve_max_vl is not None:
                vls = limit_vector_lengths(vls, self.features.sve_max_vl)
                self.fd.set_one_reg_bytes(KVM_REG_ARM64_SVE_VLS, vls)
            self.fd.finalize(VcpuFeature.SVE)
            # KVM's Z and P registers are as long as the longest length (api.rst, KVM_REG_ARM64_SVE)
            self.sve_vl = longest_vector(vls)

    def offer_pv_time(self, on: bool) -> bool:
        """Whether KVM answers the PV time calls (its KVM_REG_ARM_STD_HYP_BMAP, Linux >= 6.0):
        without PV time it is told to refuse them all, ARCH_FEATURES included, so that the guest
        looks for no stolen-time structure (before the first run: the bitmap is fixed then)."""
        try:
            bitmap = self.fd.get_one_reg(KVM_REG_ARM_STD_HYP_BMAP)
        except KvmIoctlError:  # an older KVM: it answers them as PV time is set up, or not
            return on
        if not on and bitmap & KVM_REG_ARM_STD_HYP_BIT_PV_TIME:
            self.fd.set_one_reg(KVM_REG_ARM_STD_HYP_BMAP, bitmap & ~KVM_REG_ARM_STD_HYP_BIT_PV_TIME)
        return on and bool(bitmap & KVM_REG_ARM_STD_HYP_BIT_PV_TIME)

    def init_pmu(self) -> None:
        """The PMU's overflow interrupt, then the PMU itself: once the vGIC is initialised."""
        self.fd.set_device_attr_u32(KVM_ARM_VCPU_PMU_V3_CTRL, KVM_ARM_VCPU_PMU_V3_IRQ, 16 + PMU_PPI, "PMU interrupt")
        self.fd.set_device_attr(KVM_ARM_VCPU_PMU_V3_CTRL, KVM_ARM_VCPU_PMU_V3_INIT, 0, "PMU init")

    def boot(self, entry: Entry) -> None:
        """Reset to the power-on state and point the vCPU at `entry`: EL1h, DAIF masked, MMU off,
        x0 = the context ID (booting.rst; PSCI 1.1 §6.4.3, CPU_ON and power-down wake-up)."""
        self.init(powered_off=False)
        self.set_entry(entry)

    def set_entry(self, entry: Entry) -> None:
        if self.aarch32:  # Supervisor mode; an odd address is a T32 entry (PSCI 1.1 §6.4.3.1)
            self.set_reg("pstate", PSTATE_BOOT_AA32 | (PSTATE_AA32_T if entry.address & 1 else 0))
            self.set_reg("pc", entry.address & ~1)
        else:
            self.set_reg("pstate", PSTATE_BOOT)
            self.set_reg("pc", entry.address)
        self.set_x(0, entry.context_id)
        for n, value in enumerate(entry.more, start=1):
            self.set_x(n, value)

    def reset(self, entry: Entry | None) -> None:
        """The machine's reset (thread not running): vCPU 0 back at `entry`, the others off."""
        self._power.reset(on=self._thread_starts_on)
        self._resume_at, self._suspended = None, False
        self.init(powered_off=self.index > 0)
        if entry is not None and self.index == 0:
            self.set_entry(entry)

    # --- power (PSCI 1.1 §5.7.1, §5.4, §5.20) ------------------------------------------------
    @property
    def power(self) -> Power:
        return self._power.state

    @property
    def guest_power(self) -> Power:
        """The power state as the guest sees it (PSCI AFFINITY_INFO): see pyvmm/machine/power.py."""
        return self._power.guest_power

    def request_on(self, entry: Entry) -> Power | None:
        """PSCI CPU_ON of this vCPU, from any thread: None if it is now ON_PENDING, else the state
        that refused it as the guest sees it (ON, or ON_PENDING while the vCPU is stopping)."""
        return self._power.request_on(entry)

    def power_off(self) -> None:
        """PSCI CPU_OFF, on this vCPU's own thread: leave the guest and wait for a CPU_ON."""
        self._power.turn_off()
        self.fd.run_struct.immediate_exit = 1  # the next KVM_RUN returns at once; the loop sees OFF

    def suspend(self, resume_at: Entry | None) -> None:
        """On this vCPU's thread: wait in KVM for a wake-up event (KVM_MP_STATE_SUSPENDED, the
        state KVM_CAP_ARM_SYSTEM_SUSPEND introduced). With `resume_at` the vCPU wakes from
        power-down there; without, it continues after the call (standby)."""
        self._resume_at = resume_at
        self._suspended = True
        self.fd.set_mp_state(MpState.SUSPENDED)

    @property
    def powered_down(self) -> bool:
        """In a power-down suspend: its context is lost until it wakes at its resume entry."""
        return self._resume_at is not None

    def leave_standby(self) -> bool:
        """On this vCPU's thread: if it is in a standby suspend, make it runnable (an event is
        being delivered to it). True if it was."""
        if not self._suspended or self._resume_at is not None:
            return False
        self.fd.set_mp_state(MpState.RUNNABLE)
        self._suspended = False
        return True

    def _woken(self) -> None:
        """KVM_SYSTEM_EVENT_WAKEUP: an interrupt is pending for the suspended vCPU. The suspend
        state is sticky until userspace leaves it (arch/arm64/kvm/arm.c, kvm_vcpu_suspend):
        from standby, mark it runnable; from power-down, boot it at its resume entry point."""
        self._suspended = False
        resume_at, self._resume_at = self._resume_at, None
        if resume_at is not None:
            self.boot(resume_at)
        else:
            self.fd.set_mp_state(MpState.RUNNABLE)

    # --- the thread ------------------------------------------------------------------------
    def start(self) -> None:
        self._stop = False
        # queued requests run before the guest does: a request() made while stopped only set
        # immediate_exit, so clearing it would leave them waiting for the guest's next exit.
        # Cleared first, then set again if any is queued, so that one queued in between counts.
        run = self.fd.run_struct
        run.immediate_exit = 0
        if self._requests:
            run.immediate_exit = 1
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
        """Ask the thread to end (any thread); join() waits for it."""
        self._stop = True
        self._power.stop()
        self.kick()

    def leave_guest(self) -> None:
        """On this vCPU's own thread: do not enter the guest again (the run is ending or resetting)."""
        self._stop = True
        self.fd.run_struct.immediate_exit = 1

    def join(self, deadline: float) -> bool:
        """Wait until the thread has ended, kicking it again while it runs; False if it is still
        running at `deadline` (time.monotonic())."""
        t = self.thread
        while t is not None and t.is_alive():
            if time.monotonic() >= deadline:
                return False
            self.kick()
            t.join(0.05)
        return True

    def request(self, fn: Callable[[Vcpu], None]) -> None:
        """Run `fn(vcpu)` on this vCPU's thread at its next exit (kicking it out of the guest);
        queued while the thread is stopped, it runs as soon as the thread starts."""
        self._requests.append(fn)
        self.kick()

    def defer(self, fn: Callable[[Vcpu], None]) -> None:
        """On this vCPU's own thread: run `fn(vcpu)` once the current exit has been answered and
        before the guest runs again. After a hypercall that is right away; after any other exit
        an immediate-exit KVM_RUN first lets KVM finish it (an MMIO load's register write)."""
        self._requests.append(fn)

    def on_own_thread(self) -> bool:
        t = self.thread
        return t is not None and t.ident == threading.get_ident()

    def _thread_main(self) -> None:
        try:
            while self._wait_until_on():
                self._loop()
                if self._stop:
                    break
                if self.power == Power.OFF:
                    self._exits.turned_off(self)
        except BaseException as e:  # noqa: BLE001 - any failure ends the run with its message
            self._exits.failed(self, e)

    def _wait_until_on(self) -> bool:
        """Wait while OFF; boot a pending CPU_ON. False when the thread is to end."""
        if self._stop:
            return False
        pending = self._power.wait_until_on()
        if pending is False:
            return False
        if isinstance(pending, Entry):
            self.boot(pending)
            self._exits.booting(self)  # services' per-PE state starts over (SDEI), a debugger's applies
            self._power.booted()
        return True

    def _loop(self) -> None:
        """KVM_RUN until told to stop or powered off. Hypercalls take the fast path straight
        from the exit header; every other exit is decoded into its typed value first."""
        fd = self.fd
        run, buf, words, quads = fd.run_struct, fd.mmap, fd.run_words, fd.run_quads
        kvm_run, failed, x0_value, write_x0 = fd.run, fd.failed, fd.x0_value, fd.write_x0
        exits = self._exits
        dispatch, handle_mmio, hot_reads = exits.hypercall, exits.mmio, exits.hot_reads
        requests = self._requests
        power = self._power
        while True:
            if kvm_run() and failed("KVM_RUN"):  # kicked: clear immediate_exit first, then the flags
                run.immediate_exit = 0
                while requests:
                    requests.popleft()(self)
                if self._stop or power.state != Power.ON:
                    return
                continue
            reason = words[REASON]
            if reason == _HYPERCALL:
                x0 = dispatch(self, quads[HYPERCALL_NR], quads[HYPERCALL_FLAGS])
                if x0 is not None:  # a single result: no frame between the answer and its ioctl
                    x0_value[0] = x0
                    if write_x0() < 0:
                        failed("KVM_SET_ONE_REG")
                while requests:  # KVM has nothing left to complete for a hypercall
                    requests.popleft()(self)
                continue
            if reason == _MMIO:
                hot = hot_reads.get(quads[MMIO_ADDR])
                if hot is not None and words[MMIO_LEN] == 4 and not words[MMIO_IS_WRITE] & 0xFF:
                    quads[MMIO_DATA] = hot()  # a 32-bit load of a hot register: KVM takes 4 bytes
                else:
                    handle_mmio(self, decode_mmio(buf))
            else:
                ex = decode(run)
                if isinstance(ex, SystemEventExit):
                    if ex.type == SystemEvent.WAKEUP:
                        self._woken()
                        exits.woken(self)
                    elif not exits.system_event(self, ex):
                        return
                elif isinstance(ex, DebugExit):
                    exits.debug(self, ex)
                else:
                    exits.other(self, ex)
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

"""One fake of the narrow interface services are handed (pyvmm.smccc.context): vCPUs whose
registers live in dicts, the system's power controls, RAM bounds and interrupt lines. The power
state is the real PowerState, so PSCI's transitions are the real ones. Below them, a vCPU fd
(pyvmm.kvm.fds.VcpuFd) with no kernel behind it, for driving a real Vcpu's exit loop."""

from __future__ import annotations

import errno
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from kvm_bindings import ffi
from kvm_bindings.constants import DeviceType, ExitReason
from kvm_bindings.regs import CORE_REGS, SYS_REGS
from pyvmm.errors import KvmIoctlError
from pyvmm.kvm.exits import HYPERCALL_FLAGS, HYPERCALL_NR, REASON
from pyvmm.kvm.fds import VcpuFd, VmFd
from pyvmm.machine.gic import Gic
from pyvmm.machine.power import Entry, Power, PowerState
from pyvmm.smccc.context import ServiceContext, ServiceVcpu, TraceEvent

_X_IDS = tuple(CORE_REGS[f"x{n}"] for n in range(31))
_X_BY_ID = {reg_id: n for n, reg_id in enumerate(_X_IDS)}


class FakeVcpu:
    """A vCPU for services: x0-x30 in `x`, other registers by ID in `regs`. get_x/set_x (the
    dispatcher's argument reads and result writes) are recorded in `reads` and `writes`,
    register ioctls by ID (SDEI's) counted in reg_reads/reg_writes. Work for 'its thread' is
    queued until settle()."""

    def __init__(self, index: int = 0, regs: dict[int, int] | None = None, on: bool = True) -> None:
        self.index = index
        self.mpidr = (1 << 31) | ((index >> 4) << 8) | (index & 0xF)  # as KVM assigns it
        self.x: dict[int, int] = dict(regs or {})
        self.regs: dict[int, int] = {}
        self.reads: list[int] = []
        self.writes: list[tuple[int, int]] = []
        self.reg_reads = self.reg_writes = 0
        self._power = PowerState(on)
        self.suspends: list[Entry | None] = []
        self.suspended = False
        self.resume_at: Entry | None = None
        self.queued: list[Callable[[Any], None]] = []

    # --- registers -------------------------------------------------------------------------
    def set_x0(self, value: int) -> None:
        self.set_x(0, value)

    def get_x(self, n: int) -> int:
        self.reads.append(n)
        return self.x.get(n, 0)

    def set_x(self, n: int, value: int) -> None:
        self.writes.append((n, value))
        self.x[n] = value & 0xFFFF_FFFF_FFFF_FFFF

    def get_one_reg(self, reg_id: int) -> int:
        self.reg_reads += 1
        n = _X_BY_ID.get(reg_id)
        return self.x.get(n, 0) if n is not None else self.regs.get(reg_id, 0)

    def set_one_reg(self, reg_id: int, value: int) -> None:
        self.reg_writes += 1
        n = _X_BY_ID.get(reg_id)
        if n is not None:
            self.x[n] = value & 0xFFFF_FFFF_FFFF_FFFF
        else:
            self.regs[reg_id] = value & 0xFFFF_FFFF_FFFF_FFFF

    def reg(self, name: str) -> int:
        reg_id = CORE_REGS.get(name) or SYS_REGS[name]
        n = _X_BY_ID.get(reg_id)
        return self.x.get(n, 0) if n is not None else self.regs.get(reg_id, 0)

    def set_reg(self, name: str, value: int) -> None:
        reg_id = CORE_REGS.get(name) or SYS_REGS[name]
        n = _X_BY_ID.get(reg_id)
        if n is not None:
            self.x[n] = value
        else:
            self.regs[reg_id] = value

    # --- power -----------------------------------------------------------------------------
    @property
    def power(self) -> Power:
        return self._power.state

    @property
    def guest_power(self) -> Power:
        return self._power.guest_power

    def stop(self) -> None:
        self._power.stop()

    def request_on(self, entry: Entry) -> Power | None:
        return self._power.request_on(entry)

    def power_off(self) -> None:
        self._power.turn_off()

    def boot_pending(self) -> Entry | bool:
        """What the vCPU's thread would do next: boot a pending CPU_ON (returns its entry)."""
        pending = self._power.wait_until_on()
        self._power.booted()
        return pending

    def set_power(self, on: bool) -> None:
        self._power.reset(on)

    def suspend(self, resume_at: Entry | None) -> None:
        self.suspends.append(resume_at)
        self.suspended, self.resume_at = True, resume_at

    @property
    def powered_down(self) -> bool:
        return self.resume_at is not None

    def leave_standby(self) -> bool:
        if not self.suspended or self.resume_at is not None:
            return False
        self.suspended = False
        return True

    # --- its thread ------------------------------------------------------------------------
    def leave_guest(self) -> None:
        pass

    def on_own_thread(self) -> bool:
        return False

    def request(self, fn: Callable[[Any], None]) -> None:
        self.queued.append(fn)

    def defer(self, fn: Callable[[Any], None]) -> None:
        self.queued.append(fn)

    def settle(self) -> int:
        """Run what was queued for this vCPU's thread, as its loop would before KVM_RUN."""
        ran = 0
        while self.queued:
            self.queued.pop(0)(self)
            ran += 1
        return ran


class FakeSystem:
    def __init__(self) -> None:
        self.events: list[tuple[str, int, str]] = []

    def power_off_system(self, vcpu: ServiceVcpu, message: str) -> None:
        self.events.append(("off", vcpu.index, message))

    def request_reset(self, vcpu: ServiceVcpu, message: str) -> None:
        self.events.append(("reset", vcpu.index, message))


class FakeVmFd:
    """The VM fd's ioctls that parts are handed (interrupt lines, ioeventfds, the SMCCC filter),
    recorded instead of issued; `filter_supported`/`filter_fails`: how KVM answers the filter."""

    def __init__(self, filter_supported: bool = True, filter_fails: int = 0) -> None:
        self.irqfds: list[tuple[int, int]] = []
        self.levels: list[tuple[int, int]] = []
        self.ioeventfds: list[tuple[int, int, int, int, int]] = []
        self.filter_supported, self.filter_fails = filter_supported, filter_fails
        self.installed: list[tuple[int, int, int]] = []

    def irqfd(self, fd: int, gsi: int, flags: int = 0, resamplefd: int = 0) -> None:
        self.irqfds.append((fd, gsi))

    def irq_line(self, irq: int, level: int) -> None:
        self.levels.append((irq, level))

    def ioeventfd(self, addr: int, length: int, fd: int, flags: int = 0, datamatch: int = 0) -> None:
        self.ioeventfds.append((addr, length, fd, flags, datamatch))

    def has_device_attr(self, group: int, attr: int) -> bool:
        return self.filter_supported

    def set_smccc_filter(self, base: int, nr_functions: int, action: int) -> None:
        if self.filter_fails:
            raise KvmIoctlError("KVM_SET_DEVICE_ATTR", self.filter_fails)
        self.installed.append((base, nr_functions, action))


class FakeGicDevice:
    """A vGIC device fd: the attributes set on it, recorded."""

    def __init__(self, kind: int) -> None:
        self.kind = kind
        self.attrs: list[tuple[int, int, int]] = []
        self.closed = False

    def set_device_attr_u64(self, group: int, attr: int, value: int, context: str = "") -> None:
        self.attrs.append((group, attr, value))

    def set_device_attr(self, group: int, attr: int, addr: int = 0, context: str = "") -> None:
        self.attrs.append((group, attr, addr))

    def close(self) -> None:
        self.closed = True


class FakeGicVmFd:
    """The VM fd's KVM_CREATE_DEVICE as a host of the given vGIC answers it: a GICv2-only host
    (a GIC-400 board) refuses the vGICv3 with ENODEV (arch/arm64/kvm/vgic/vgic-kvm-device.c)."""

    def __init__(self, version: int, *, its: bool = True, v2_compatible: bool = True) -> None:
        self.version = version
        self.offered = {DeviceType.ARM_VGIC_V3: version == 3, DeviceType.ARM_VGIC_ITS: version == 3 and its,
                        DeviceType.ARM_VGIC_V2: version == 2 or v2_compatible}
        self.devices: list[FakeGicDevice] = []

    def can_create_device(self, kind: int) -> bool:
        return self.offered[DeviceType(kind)]

    def create_device(self, kind: int) -> FakeGicDevice:
        if not self.can_create_device(kind):
            raise KvmIoctlError("KVM_CREATE_DEVICE", errno.ENODEV)
        self.devices.append(FakeGicDevice(kind))
        return self.devices[-1]


def gic_layout(cpus: int, version: int = 3, irqchip: str = "auto") -> Gic:
    """pyvmm's own Gic, made on a fake VM fd of a host with that vGIC (what the DT needs of it)."""
    return Gic(cast(VmFd, FakeGicVmFd(version)), cpus, irqchip)


class FakeRam:
    def __init__(self, base: int = 0x8000_0000, size: int = 0x100_0000) -> None:
        self.base, self.size = base, size

    def contains(self, gpa: int, size: int = 1) -> bool:
        return self.base <= gpa and gpa + size <= self.base + self.size


class FakeLines:
    """Interrupt lines as SDEI sees them: what reaches the vGIC is recorded; INTID 52 is wired to
    an irqfd, as a virtio device's line is."""

    def __init__(self) -> None:
        self.interceptor: Callable[[int, bool], bool] | None = None
        self.gic_lines: list[tuple[int, bool]] = []
        self.irqfds = {52}

    def intercept(self, interceptor: Callable[[int, bool], bool]) -> None:
        self.interceptor = interceptor

    def to_gic(self, intid: int, level: bool) -> None:
        self.gic_lines.append((intid, level))

    def is_irqfd(self, intid: int) -> bool:
        return intid in self.irqfds


@dataclass
class FakeMachine:
    """A ServiceContext around fake vCPUs, with the fakes themselves at hand."""

    vcpus: list[FakeVcpu]
    system: FakeSystem = field(default_factory=FakeSystem)
    ram: FakeRam = field(default_factory=FakeRam)
    lines: FakeLines = field(default_factory=FakeLines)
    conduit: str = "hvc"

    def context(self, trace: Callable[[TraceEvent], None] | None = None) -> ServiceContext:
        """The context services get; `trace`: where their trace lines go (a Dispatcher's emit)."""
        return ServiceContext(self.vcpus, self.ram, self.system, self.conduit, trace or (lambda event: None),
                              self.lines)


def machine(cpus: int = 4, *, all_on: bool = False, conduit: str = "hvc") -> FakeMachine:
    """`cpus` fake vCPUs: vCPU 0 on and the others off, as at boot (or all on)."""
    return FakeMachine([FakeVcpu(i, on=all_on or i == 0) for i in range(cpus)], conduit=conduit)


class FakeVcpuFd:
    """What a Vcpu uses of its VcpuFd, with no kernel behind it: registers by ID in `regs`, x0's
    prepared write in x0_value. arm(n) makes KVM_RUN answer n times with the exit in kvm_run
    (hypercall() puts a forwarded call there) and then fail as a kick does, which ends the loop
    of a vCPU told to leave the guest (leave_guest()). run() and write_x0() are C-level
    callables, as VcpuFd's prepared ioctls are, so that benchmarks/dispatch.py can time the loop
    on it."""

    set_x0 = VcpuFd.set_x0  # the real one: a store into x0_value, then write_x0()

    def __init__(self, mpidr: int = 1 << 31) -> None:
        self.mmap = bytearray(ffi.sizeof("struct kvm_run"))
        self.run_struct = ffi.from_buffer("struct kvm_run *", self.mmap)
        self.run_words = memoryview(self.mmap).cast("I")
        self.run_quads = memoryview(self.mmap).cast("Q")
        self.x0_value = memoryview(bytearray(8)).cast("Q")
        self.write_x0: Callable[[], int] = itertools.repeat(0).__next__  # KVM_SET_ONE_REG succeeds
        self.run: Callable[[], int] = iter([-1]).__next__
        self.regs: dict[int, int] = {SYS_REGS["mpidr_el1"]: mpidr}

    def hypercall(self, function_id: int, flags: int = 0) -> None:
        """kvm_run as KVM_EXIT_HYPERCALL leaves it for a forwarded SMCCC call."""
        self.run_words[REASON] = ExitReason.HYPERCALL.value
        self.run_quads[HYPERCALL_NR] = function_id
        self.run_quads[HYPERCALL_FLAGS] = flags

    def mmio(self, addr: int, size: int, is_write: bool = False, data: int = 0) -> None:
        """kvm_run as KVM_EXIT_MMIO leaves it for a load (or a store of `data`) at `addr`."""
        self.run_words[REASON] = ExitReason.MMIO.value
        mmio = self.run_struct.mmio
        mmio.phys_addr, mmio.len, mmio.is_write = addr, size, int(is_write)
        ffi.buffer(mmio.data)[:] = data.to_bytes(8, "little")

    def arm(self, exits: int) -> None:
        self.run = iter([0] * exits + [-1]).__next__

    def failed(self, name: str) -> bool:
        """A -1 from run() is a kick; from anything else, the ioctl's failure."""
        if name == "KVM_RUN":
            return True
        raise KvmIoctlError(name, errno.EIO)

    def get_one_reg(self, reg_id: int) -> int:
        return self.regs.get(reg_id, 0)

    def get_x(self, n: int) -> int:
        return self.regs.get(_X_IDS[n], 0)

    def set_one_reg(self, reg_id: int, value: int) -> None:
        self.regs[reg_id] = value & 0xFFFF_FFFF_FFFF_FFFF

    def vcpu_init(self, target: int, features: list[int]) -> None:
        pass

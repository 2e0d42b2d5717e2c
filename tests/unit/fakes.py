"""Fakes for unit tests of pure logic: a vCPU whose registers live in a dict."""

from __future__ import annotations

from kvm_bindings import ffi


class FakeFd:
    def __init__(self, vcpu: FakeVcpu) -> None:
        self.vcpu = vcpu
        self.x0_value = ffi.new("uint64_t *")

    def write_x0(self) -> int:
        self.vcpu.set_x(0, self.x0_value[0])
        return 0

    def failed(self, name: str) -> bool:
        raise AssertionError(name)


class FakeVcpu:
    """Counts register reads and writes, so tests can pin how many ioctls an exit costs."""

    def __init__(self, index: int = 0, regs: dict[int, int] | None = None) -> None:
        self.index = index
        self.x = dict(regs or {})
        self.reads: list[int] = []
        self.writes: list[tuple[int, int]] = []
        self.fd = FakeFd(self)

    def get_x(self, n: int) -> int:
        self.reads.append(n)
        return self.x.get(n, 0)

    def set_x(self, n: int, value: int) -> None:
        self.writes.append((n, value))
        self.x[n] = value


class FakeMachine:
    """Just enough of a Vm for services: vCPUs with MPIDRs and power states, RAM bounds, and a
    record of the system-level requests services make."""

    def __init__(self, cpus: int = 4, ram: tuple[int, int] = (0x8000_0000, 0x100_0000)) -> None:
        import threading

        from pyvmm.vcpu import Power

        self.power_lock = threading.Lock()
        self.ram = ram
        self.events: list[tuple] = []
        self.vcpus = [FakePoweredVcpu(self, i) for i in range(cpus)]
        self.vcpus[0].power = Power.ON
        self.memory = self

    def contains(self, gpa: int, size: int = 1) -> bool:
        base, length = self.ram
        return base <= gpa and gpa + size <= base + length

    def suspend(self, vcpu, resume_at) -> None:  # type: ignore[no-untyped-def]
        self.events.append(("suspend", vcpu.index, resume_at))

    def request_reset(self, vcpu, message: str) -> None:  # type: ignore[no-untyped-def]
        self.events.append(("reset", vcpu.index, message))

    def power_off_system(self, vcpu, message: str) -> None:  # type: ignore[no-untyped-def]
        self.events.append(("off", vcpu.index, message))


class FakePoweredVcpu(FakeVcpu):
    def __init__(self, machine: FakeMachine, index: int) -> None:
        from pyvmm.vcpu import Power

        super().__init__(index)
        self.machine = machine
        self.mpidr = (1 << 31) | ((index >> 4) << 8) | (index & 0xF)  # as KVM assigns it
        self.power = Power.OFF
        self.booted: tuple[int, int] | None = None

    def power_on(self, entry: int, context_id: int) -> None:
        from pyvmm.vcpu import Power

        self.power = Power.ON_PENDING
        self.booted = (entry, context_id)

    def power_off(self) -> None:
        from pyvmm.vcpu import Power

        self.power = Power.OFF


class FakeRegsFd(FakeFd):
    """A vCPU fd whose KVM_{GET,SET}_ONE_REG work on a dict keyed by register ID."""

    def get_one_reg(self, reg_id: int) -> int:
        self.vcpu.reg_reads += 1
        return self.vcpu.regs.get(reg_id, 0)

    def set_one_reg(self, reg_id: int, value: int) -> None:
        self.vcpu.reg_writes += 1
        self.vcpu.regs[reg_id] = value & 0xFFFF_FFFF_FFFF_FFFF

    def set_mp_state(self, state: int) -> None:
        self.vcpu.mp_state = state


class FakeSdeiVcpu(FakePoweredVcpu):
    """A powered vCPU with a full register file and a queue of work for 'its thread'."""

    def __init__(self, machine: FakeMachine, index: int) -> None:
        from kvm_bindings.regs import CORE_REGS

        super().__init__(machine, index)
        self._ids = {n: CORE_REGS[f"x{n}"] for n in range(31)}
        self.regs: dict[int, int] = {}
        self.reg_reads = self.reg_writes = 0
        self.fd = FakeRegsFd(self)
        self.thread = None
        self.queued: list = []
        self.suspended = False
        self.resume_at = None
        self.mp_state = 0

    def get_x(self, n: int) -> int:
        self.reads.append(n)
        return self.fd.get_one_reg(self._ids[n])

    def set_x(self, n: int, value: int) -> None:
        self.writes.append((n, value))
        self.fd.set_one_reg(self._ids[n], value)

    def reg(self, name: str) -> int:
        from kvm_bindings.regs import CORE_REGS, SYS_REGS

        return self.regs.get(CORE_REGS.get(name) or SYS_REGS[name], 0)

    def set_reg(self, name: str, value: int) -> None:
        from kvm_bindings.regs import CORE_REGS, SYS_REGS

        self.regs[CORE_REGS.get(name) or SYS_REGS[name]] = value

    def request(self, fn) -> None:  # type: ignore[no-untyped-def]
        self.queued.append(fn)

    defer = request

    def settle(self) -> int:
        """Run what was queued for this vCPU's thread, as its loop would before KVM_RUN."""
        ran = 0
        while self.queued:
            self.queued.pop(0)(self)
            ran += 1
        return ran


class FakeDispatcherHost:
    trace = None


class FakeSdeiMachine(FakeMachine):
    """Every vCPU ON, with registers; records the vGIC lines SDEI drives."""

    def __init__(self, cpus: int = 2) -> None:
        import threading

        from pyvmm.vcpu import Power

        self.power_lock = threading.Lock()
        self.ram = (0x8000_0000, 0x100_0000)
        self.events = []
        self.vcpus = [FakeSdeiVcpu(self, i) for i in range(cpus)]
        for v in self.vcpus:
            v.power = Power.ON
        self.memory = self
        self.smccc = FakeDispatcherHost()
        self.gic_lines: list[tuple[int, bool]] = []
        self.irqfd_spis: set[int] = {20}  # INTID 52 is wired to an irqfd, as a virtio device's is

    def raise_gic_line(self, intid: int, level: bool) -> None:
        self.gic_lines.append((intid, level))

"""A virtual machine: KVM VM fd, guest RAM, vCPUs, the MMIO bus and the SMCCC dispatcher.

Life cycle: build (`Vm(...)`, add memory, devices and SMCCC services, load images), then `run()`:
the SMCCC filter is installed (it must precede the first KVM_RUN), one thread per vCPU runs
(vCPU 0 in the guest, the others waiting for PSCI CPU_ON), and `run()` returns a `RunResult` when
the guest powers off, crashes, fails, or the time limit passes (then every vCPU is kicked out of
the guest, wherever it was). A PSCI SYSTEM_RESET restarts the guest from its boot state within
the same run: every vCPU stops and is re-initialised, and the boot images are loaded again.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from kvm_bindings.constants import (
    KVM_ARM_IRQ_TYPE_SHIFT,
    KVM_ARM_IRQ_TYPE_SPI,
    KVM_MEM_READONLY,
    Cap,
    MpState,
    SystemEvent,
    VcpuFeature,
)
from kvm_bindings.regs import PSTATE_BOOT
from pyvmm.console import ConsoleOutput
from pyvmm.devices.bus import MmioBus, MmioDevice
from pyvmm.devices.serial import SerialPort
from pyvmm.errors import GuestError, GuestMemoryError, KvmUnavailableError, VmmError
from pyvmm.exits import (
    Exit,
    FailEntryExit,
    InternalErrorExit,
    InterruptedExit,
    MmioExit,
    NisvExit,
    SystemEventExit,
    complete_mmio_read,
)
from pyvmm.irqchip import NR_IRQS, SPI_BASE, Gic, InKernelRegion
from pyvmm.kvm import Kvm
from pyvmm.loader import file_size
from pyvmm.memory import GuestMemory
from pyvmm.smccc import filter as smccc_filter
from pyvmm.smccc.dispatcher import Dispatcher
from pyvmm.vcpu import Power, Vcpu, install_kick_handler

if TYPE_CHECKING:
    from pyvmm.devices.virtio.device import VirtioDevice
    from pyvmm.devices.virtio.mmio import VirtioMmio
    from pyvmm.services.sdei import EventSpec, Sdei

log = logging.getLogger("pyvmm")

RAM_BASE = 0x8000_0000  # kvmtool's arm64 layout: RAM from 2 GiB
REQUIRED_CAPS = (Cap.ONE_REG, Cap.ARM_PSCI_0_2, Cap.IMMEDIATE_EXIT)


class RunResult:
    """Why a run ended. `reason`: poweroff, reset, crash, suspend, timeout, stopped or error."""

    __slots__ = ("reason", "message", "vcpu", "data", "elapsed")

    def __init__(self, reason: str, message: str = "", vcpu: int | None = None, data: tuple[int, ...] = ()) -> None:
        self.reason, self.message, self.vcpu, self.data = reason, message, vcpu, data
        self.elapsed = 0.0

    @property
    def ok(self) -> bool:
        return self.reason == "poweroff"

    def __repr__(self) -> str:
        return f"RunResult({self})"

    def __str__(self) -> str:
        who = f" (vcpu{self.vcpu})" if self.vcpu is not None else ""
        return f"{self.reason}{who}{': ' + self.message if self.message else ''}"


class UnhandledMmio:
    """Accesses to guest-physical addresses with neither RAM nor a device behind them.

    policy "ignore": loads read as zero, stores are dropped (kvmtool's choice), the first 256 are
    kept in `accesses` and logged; "stop": the run ends with an error naming the access.
    """

    def __init__(self, policy: str) -> None:
        self.policy = policy
        self.accesses: list[MmioExit] = []


class Vm:
    def __init__(self, *, cpus: int = 1, mem_mib: int = 64, ram_base: int = RAM_BASE,
                 kvm_path: str = "/dev/kvm", unhandled_mmio: str = "ignore", conduit: str = "hvc",
                 psci: bool = True, console: Callable[[int], None] | None = None) -> None:
        """`conduit`: the SMCCC conduit every service answers on (the other gets NOT_SUPPORTED).
        `psci`: service PSCI 1.1 in pyvmm (else KVM's in-kernel PSCI answers).
        `console`: where the serial port's output bytes go (default: stdout, a line at a time)."""
        if cpus < 1:
            raise VmmError(f"a VM needs at least one vCPU, not {cpus}")
        if mem_mib < 1:
            raise VmmError(f"a VM needs some memory, not {mem_mib} MiB")
        if unhandled_mmio not in ("ignore", "stop"):
            raise VmmError(f"unhandled MMIO policy is 'ignore' or 'stop', not {unhandled_mmio!r}")
        machine = os.uname().machine
        if machine != "aarch64":
            raise KvmUnavailableError(
                f"pyvmm needs an arm64 host's KVM, this host is {machine} "
                "(`make demo` and `make test` run pyvmm inside an emulated arm64 host)")
        install_kick_handler()
        self.kvm = Kvm(kvm_path)
        for cap in REQUIRED_CAPS:
            if not self.kvm.check_extension(cap):
                raise KvmUnavailableError(f"this KVM lacks KVM_CAP_{cap.name}, which pyvmm needs")
        max_vcpus = self.kvm.check_extension(Cap.MAX_VCPUS) or self.kvm.check_extension(Cap.NR_VCPUS)
        if cpus > max_vcpus:
            raise VmmError(f"{cpus} vCPUs requested, this KVM allows at most {max_vcpus}")
        self.fd = self.kvm.create_vm()
        self.memory = GuestMemory()
        self.mmio = MmioBus()
        self.smccc = Dispatcher(conduit)
        self.unhandled_mmio = UnhandledMmio(unhandled_mmio)
        self.ram_base = ram_base
        self.add_memory(ram_base, mem_mib << 20)
        if self.fd.check_extension(Cap.ARM_NISV_TO_USER):
            # report MMIO accesses KVM cannot decode as KVM_EXIT_ARM_NISV instead of failing KVM_RUN
            self.fd.enable_cap(Cap.ARM_NISV_TO_USER)
        self._target, _ = self.fd.preferred_target()
        self.power_lock = threading.Lock()  # every vCPU's power state
        self.before_power_on: Callable[[Vcpu], None] | None = None  # hook: a vCPU is about to boot
        self.dt_devices: list = []  # devices that contribute a device-tree node
        self.virtio: list[VirtioMmio] = []  # add_virtio()
        self.irqfd_spis: set[int] = set()  # SPIs KVM raises from an eventfd (irqfd())
        self._next_spi = 0
        self.gic = Gic(self.fd, cpus)
        for base, size, name in self.gic.regions:
            self.add_device(base, size, InKernelRegion(), name)
        self.console = ConsoleOutput() if console is None else console
        self.serial = SerialPort(self, self.console)
        self.vcpus = [self._create_vcpu(i) for i in range(cpus)]
        self.gic.finalize()
        self.vcpus[0].power = Power.ON
        self._images: list[tuple] = []  # (gpa, data) or (gpa, path, size): loaded again on reset
        self._boot: tuple[int, int] | None = None  # (entry, x0) of vCPU 0
        self._done = threading.Event()
        self._result: RunResult | None = None
        self._result_lock = threading.Lock()
        self._reset_pending: str | None = None
        self.resets = 0
        self._ran = False
        self._filter_installed = False
        self.sdei: Sdei | None = None  # enable_sdei()
        if psci:
            from pyvmm.services.psci import Psci
            from pyvmm.services.std_hyp import StandardHypervisor

            self.psci: Psci | None = Psci(self)
            self.smccc.add_service(self.psci)
            self.smccc.add_service(StandardHypervisor())
        else:
            self.psci = None

    # --- building ------------------------------------------------------------------------
    def add_memory(self, gpa: int, size: int, *, readonly: bool = False) -> None:
        if (m := self.mmio.overlaps(gpa, size)) is not None:
            raise GuestMemoryError(f"memory {gpa:#x}+{size:#x} overlaps device {m.name} at {m.base:#x}")
        region = self.memory.add(gpa, size, readonly=readonly)
        self.fd.set_user_memory_region(region.slot, gpa, size, region.host_addr,
                                       KVM_MEM_READONLY if readonly else 0)

    def add_device(self, base: int, size: int, device: MmioDevice, name: str, dt: object = None) -> None:
        """Put `device` on the MMIO bus; `dt`, if given, contributes its node (dt_node(phandles))."""
        for r in self.memory.regions:
            if r.overlaps(base, size):
                raise VmmError(f"device {name} at {base:#x}+{size:#x} overlaps guest RAM {r.gpa:#x}+{r.size:#x}")
        self.mmio.add(base, size, device, name)
        if dt is not None:
            self.dt_devices.append(dt)

    def add_virtio(self, device: VirtioDevice) -> VirtioMmio:
        """Attach a virtio device on its own virtio-mmio transport, at the next of kvmtool's
        virtio-mmio slots (0x3000000 + 0x200 * n) with the next SPI."""
        from pyvmm.devices.virtio.mmio import VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE, VirtioMmio

        if self._ran:
            raise VmmError("add devices before the VM first runs")
        transport = VirtioMmio(self, device, VIRTIO_MMIO_BASE + VIRTIO_MMIO_SIZE * len(self.virtio),
                               self.allocate_spi())
        self.virtio.append(transport)
        return transport

    def allocate_spi(self) -> int:
        """The next free shared peripheral interrupt (SPI number, INTID 32 + n)."""
        spi = self._next_spi
        if SPI_BASE + spi >= NR_IRQS:
            raise VmmError(f"no interrupt line left: the GIC has {NR_IRQS - SPI_BASE} SPIs")
        self._next_spi += 1
        return spi

    def set_spi(self, spi: int, level: bool) -> None:
        """Drive an SPI's line (any thread). It goes to the vGIC, unless the guest has bound it to
        an SDEI event and registered that event (SDEI_INTERRUPT_BIND): then SDEI takes it."""
        intid = SPI_BASE + spi
        sdei = self.sdei
        if sdei is not None and sdei.interrupt(intid, level):
            return
        self.raise_gic_line(intid, level)

    def irqfd(self, fd: int, spi: int) -> None:
        """Have KVM raise SPI `spi` whenever eventfd `fd` is signalled (KVM_IRQFD; on arm64 the
        GSI is the SPI number). Such a line bypasses pyvmm, so SDEI cannot bind it."""
        self.fd.irqfd(fd, spi)
        self.irqfd_spis.add(spi)

    def raise_gic_line(self, intid: int, level: bool) -> None:
        """KVM_IRQ_LINE for an SPI: irq_type SPI, irq_id = INTID."""
        self.fd.irq_line((KVM_ARM_IRQ_TYPE_SPI << KVM_ARM_IRQ_TYPE_SHIFT) | intid, int(level))

    def enable_sdei(self, events: Iterable[EventSpec] = ()) -> Sdei:
        """Service SDEI 1.1 in pyvmm with event 0 and the declared platform `events`; the SDEI
        function range is forwarded from now on (before run()) and the device tree advertises
        /firmware/sdei on the VM's conduit."""
        from pyvmm.services.sdei import Sdei

        if self._filter_installed:
            raise VmmError("enable SDEI before the VM first runs (the SMCCC filter is fixed then)")
        if self.sdei is not None:
            raise VmmError("SDEI is already enabled on this VM")
        self.sdei = Sdei(self, events)
        self.smccc.add_service(self.sdei)
        return self.sdei

    def _create_vcpu(self, index: int) -> Vcpu:
        fd = self.fd.create_vcpu(index)
        vcpu = Vcpu(self, index, fd)
        self.init_vcpu(vcpu, powered_off=index > 0)
        vcpu.mpidr = vcpu.get_reg("mpidr_el1")
        return vcpu

    def init_vcpu(self, vcpu: Vcpu, *, powered_off: bool) -> None:
        """KVM_ARM_VCPU_INIT with the preferred target: PSCI 0.2+, secondaries powered off."""
        features = 1 << VcpuFeature.PSCI_0_2
        if powered_off:
            features |= 1 << VcpuFeature.POWER_OFF
        vcpu.fd.vcpu_init(self._target, [features, 0, 0, 0, 0, 0, 0])

    def load(self, data: bytes, gpa: int | None = None) -> int:
        """Copy an image into guest RAM (default: the start of RAM); returns its address."""
        gpa = self.ram_base if gpa is None else gpa
        if not self.memory.contains(gpa, max(len(data), 1)):
            raise GuestMemoryError(f"image of {len(data)} bytes does not fit in guest RAM at {gpa:#x}")
        self.memory.write(gpa, data)
        self._images.append((gpa, bytes(data)))
        return gpa

    def load_path(self, path: str | os.PathLike[str], gpa: int, size: int) -> None:
        """Read `size` bytes of a file straight into guest RAM (no copy in between); a reset
        reads it again."""
        view = self.memory.view(gpa, size)  # bounds-checked
        try:
            with open(path, "rb") as f:
                got = f.readinto(view)
        except OSError as e:
            raise VmmError(f"cannot read {path}: {e.strerror}") from None
        if got != size:
            raise VmmError(f"{path} changed while it was being loaded")
        self._images.append((gpa, os.fspath(path), size))  # type: ignore[arg-type]

    def load_file(self, path: str | os.PathLike[str], gpa: int | None = None) -> int:
        """Load a file into guest RAM (default: the start of RAM); returns its address."""
        gpa = self.ram_base if gpa is None else gpa
        size = file_size(path, "image")
        if not self.memory.contains(gpa, size):
            raise GuestMemoryError(f"image of {size} bytes does not fit in guest RAM at {gpa:#x}")
        self.load_path(path, gpa, size)
        return gpa

    def set_boot(self, entry: int, x0: int = 0) -> None:
        """Boot vCPU 0 at `entry` in EL1h with DAIF masked and x0 = `x0` (booting.rst)."""
        if not self.memory.contains(entry, 4):
            raise GuestMemoryError(f"entry point {entry:#x} is not in guest RAM")
        self._boot = (entry, x0)
        self._set_entry(self.vcpus[0], entry, x0)

    def boot_vcpu(self, vcpu: Vcpu, entry: int, x0: int) -> None:
        """Reset `vcpu` to its power-on state and point it at `entry` with x0 (PSCI CPU_ON and
        power-down wake-up entry state: EL1h, DAIF masked, MMU off; PSCI 1.1 §6.4.3)."""
        self.init_vcpu(vcpu, powered_off=False)
        self._set_entry(vcpu, entry, x0)

    @staticmethod
    def _set_entry(vcpu: Vcpu, entry: int, x0: int) -> None:
        vcpu.set_reg("pstate", PSTATE_BOOT)
        vcpu.set_reg("pc", entry)
        vcpu.set_x(0, x0)

    def _reset(self) -> None:
        """Back to the boot state: images reloaded, vCPU 0 at the entry point, the rest off."""
        for gpa, *image in self._images:
            if len(image) == 1:
                self.memory.write(gpa, image[0])
            else:
                path, size = image
                with open(path, "rb") as f:
                    f.readinto(self.memory.view(gpa, size))
        with self.power_lock:
            for v in self.vcpus:
                v.power = Power.ON if v.index == 0 else Power.OFF
                v.resume_at = None
                v.suspended = False
        for v in self.vcpus:
            self.init_vcpu(v, powered_off=v.index > 0)
        if self._boot is not None:
            self._set_entry(self.vcpus[0], *self._boot)
        for transport in self.virtio:
            transport.reset()
        self.smccc.reset()

    # --- running -------------------------------------------------------------------------
    def install_smccc_filter(self) -> None:
        """Install the filter the dispatcher's routes call for (run() does this if not yet done)."""
        if not self._filter_installed:
            smccc_filter.install(self.fd, self.smccc.filter_ranges())
            self._filter_installed = True

    def run(self, timeout: float | None = None) -> RunResult:
        """Run until the guest powers off or fails, or `timeout` seconds pass (resets included)."""
        if self._ran:
            raise VmmError("this VM has already run; build a new Vm to run again")
        self.install_smccc_filter()
        self._ran = True
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        log.info("entering the guest: %d vCPUs, %d MiB", len(self.vcpus), self.memory.regions[0].size >> 20)
        for v in self.vcpus:
            v.start()
        try:
            while True:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                if not self._done.wait(left):
                    self._finish(RunResult("timeout", f"the guest was still running after {timeout:g} s"))
                    break
                with self._result_lock:
                    if self._result is not None:
                        break
                    log.info("guest reset: %s", self._reset_pending)
                    self._reset_pending = None
                    self._done.clear()
                self._stop_all()
                self._reset()
                self.resets += 1
                for v in self.vcpus:
                    v.start()
        except KeyboardInterrupt:
            self._finish(RunResult("stopped", "interrupted"))
        finally:
            self._stop_all()
            if isinstance(self.console, ConsoleOutput):
                self.console.flush()
        assert self._result is not None
        self._result.elapsed = time.monotonic() - started
        return self._result

    def request_reset(self, vcpu: Vcpu, message: str) -> None:
        """From a vCPU thread: restart the guest from its boot state (PSCI SYSTEM_RESET)."""
        vcpu.leave_guest()
        with self._result_lock:
            self._reset_pending = message
        self._done.set()

    def power_off_system(self, vcpu: Vcpu, message: str) -> None:
        """From a vCPU thread: the guest is off (PSCI SYSTEM_OFF); the run ends with status 0."""
        vcpu.leave_guest()
        self._finish(RunResult("poweroff", message, vcpu.index))

    def check_all_off(self) -> None:
        """Every vCPU off and none pending: nothing can run again, so the run ends."""
        with self.power_lock:
            if any(v.power != Power.OFF for v in self.vcpus):
                return
        self._finish(RunResult("halted", "every vCPU is off (PSCI CPU_OFF) and none can be woken"))

    def stop(self, message: str = "stopped by request") -> None:
        """Stop a running VM from any thread."""
        self._finish(RunResult("stopped", message))

    def _finish(self, result: RunResult) -> None:
        with self._result_lock:
            if self._result is None:
                self._result = result
        self._done.set()

    def _stop_all(self) -> None:
        for v in self.vcpus:
            v.stop()
        deadline = time.monotonic() + 10.0
        for v in self.vcpus:
            while v.thread is not None and v.thread.is_alive():
                v.kick()
                v.thread.join(0.05)
                if time.monotonic() > deadline:
                    raise VmmError(f"vcpu{v.index} did not stop within 10 s of being kicked")

    def fail(self, vcpu: Vcpu, error: BaseException) -> None:
        """A vCPU thread ended with an exception: the run ends with its message."""
        if isinstance(error, VmmError):
            msg = str(error)
        else:
            import traceback

            msg = f"internal error: {type(error).__name__}: {error}"
            log.debug("vcpu%d failed:\n%s", vcpu.index, "".join(traceback.format_exception(error)))
        self._finish(RunResult("error", msg, vcpu.index))

    # --- exits ---------------------------------------------------------------------------
    def handle_mmio(self, vcpu: Vcpu, ex: MmioExit) -> None:
        m = self.mmio.find(ex.addr, ex.size)
        if m is not None:
            off = ex.addr - m.base
            if ex.is_write:
                m.device.write(off, ex.size, ex.data)
            else:
                complete_mmio_read(vcpu.fd.mmap, m.device.read(off, ex.size), ex.size)
            return
        access = f"{'write' if ex.is_write else 'read'} of {ex.size} bytes at {ex.addr:#x}"
        if self.unhandled_mmio.policy == "stop":
            raise GuestError(f"guest {access}: no RAM or device there")
        if len(self.unhandled_mmio.accesses) < 256:
            self.unhandled_mmio.accesses.append(ex)
            log.warning("vcpu%d: %s hits no RAM or device (reads as 0, writes ignored)", vcpu.index, access)
        if not ex.is_write:
            complete_mmio_read(vcpu.fd.mmap, 0, ex.size)

    def handle_exit(self, vcpu: Vcpu, ex: Exit) -> bool:
        """Exits other than hypercall and MMIO. Returns False when this vCPU's loop must end."""
        if isinstance(ex, InterruptedExit):
            return True
        if isinstance(ex, SystemEventExit):
            reason = {SystemEvent.SHUTDOWN: "poweroff", SystemEvent.RESET: "reset",
                      SystemEvent.CRASH: "crash", SystemEvent.SUSPEND: "suspend"}.get(ex.type)
            if reason is None:
                if ex.type == SystemEvent.WAKEUP:
                    self._wake_up(vcpu)
                    return True
                reason = ex.name
            self._finish(RunResult(reason, f"guest system event {ex.name}", vcpu.index, ex.data))
            return False
        if isinstance(ex, NisvExit):
            pc = vcpu.get_reg("pc")
            raise GuestError(f"guest access at {ex.fault_ipa:#x} (PC {pc:#x}) is to no RAM or device and KVM "
                             f"cannot decode it (no valid ISV, ESR ISS {ex.esr_iss:#x})")
        if isinstance(ex, FailEntryExit):
            raise GuestError(f"KVM could not enter the guest (hardware reason {ex.reason:#x})")
        if isinstance(ex, InternalErrorExit):
            raise GuestError(f"KVM internal error {ex.suberror} {ex.data}")
        raise GuestError(f"unhandled KVM exit {ex}")

    def suspend(self, vcpu: Vcpu, resume_at: tuple[int, int] | None) -> None:
        """On `vcpu`'s thread: wait in KVM for a wake-up event (KVM_MP_STATE_SUSPENDED, the state
        KVM_CAP_ARM_SYSTEM_SUSPEND introduced). With `resume_at` (entry, context ID) the vCPU
        wakes from power-down there; without, it continues after the call (standby)."""
        vcpu.resume_at = resume_at
        vcpu.suspended = True
        vcpu.fd.set_mp_state(MpState.SUSPENDED)

    def _wake_up(self, vcpu: Vcpu) -> None:
        """KVM_SYSTEM_EVENT_WAKEUP: an interrupt is pending for the suspended vCPU. The suspend
        state is sticky until userspace leaves it (arch/arm64/kvm/arm.c, kvm_vcpu_suspend):
        from standby, mark it runnable; from power-down, boot it at its resume entry point."""
        vcpu.suspended = False
        if vcpu.resume_at is not None:
            entry, context_id = vcpu.resume_at
            vcpu.resume_at = None
            self.boot_vcpu(vcpu, entry, context_id)
        else:
            vcpu.fd.set_mp_state(MpState.RUNNABLE)
        self.smccc.woken(vcpu)

    # --- teardown ------------------------------------------------------------------------
    def close(self) -> None:
        for transport in self.virtio:  # their workers stop and drop their views of guest RAM
            transport.close()
        for v in self.vcpus:
            v.fd.close()
        self.gic.close()
        self.memory.close()
        self.fd.close()
        self.kvm.close()

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""A virtual machine, composed: the KVM VM fd, guest RAM, the vGIC, interrupt lines, vCPUs, the
MMIO bus with its devices, and the SMCCC dispatcher with its services. This is pyvmm's Python API.

Each part is handed only what it needs: a device its guest memory and interrupt line, a service
its ServiceContext (vCPUs and their power control, RAM bounds, system power, trace), a vCPU the
exit handler. The order in which parts are made, run, reset, stopped and freed is written down
once, in pyvmm/machine/lifecycle.py: build (`Vm(...)`, then add devices, services and images), `run()`,
a guest's SYSTEM_RESET within the run, `stop()` from any thread, `close()`.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from typing import TYPE_CHECKING

from kvm_bindings.constants import KVM_MEM_READONLY, Cap
from pyvmm.devices.bus import MmioBus, MmioDevice
from pyvmm.devices.serial import SerialPort
from pyvmm.errors import GuestMemoryError, KvmIoctlError, KvmUnavailableError, SharedMemoryRefusedError, VmmError
from pyvmm.kvm.fds import Kvm
from pyvmm.machine import cpu_features
from pyvmm.machine.cpu_features import AS_THE_HOST_OFFERS, CpuOptions
from pyvmm.machine.exit_dispatch import MachineExits, UnhandledMmio
from pyvmm.machine.gic import Gic, InKernelRegion
from pyvmm.machine.host import HOST_NOTES, vm_ipa_bits
from pyvmm.machine.host_console import ConsoleOutput
from pyvmm.machine.images import BlobImage, Image, file_image, file_size, unpack_gzip
from pyvmm.machine.irq_lines import InterruptLines
from pyvmm.machine.kick import install_kick_handler
from pyvmm.machine.lifecycle import Lifecycle, RunResult
from pyvmm.machine.memory import RAM_BASE, GuestMemory
from pyvmm.machine.power import Entry
from pyvmm.machine.vcpu import Vcpu
from pyvmm.smccc import filter as smccc_filter
from pyvmm.smccc.context import ServiceContext
from pyvmm.smccc.dispatcher import Dispatcher
from pyvmm.smccc.function_id import PV_TIME_FUNCTIONS, TRNG_FUNCTIONS, Owner

if TYPE_CHECKING:
    from devicetree.builder import Node
    from devicetree.machvirt import DtPart
    from pyvmm.devices.virtio.device import VirtioDevice
    from pyvmm.devices.virtio.transport import VirtioMmio
    from pyvmm.gdb.server import GdbServer
    from pyvmm.services.psci import Psci
    from pyvmm.services.sdei import EventSpec, Sdei

log = logging.getLogger("pyvmm")

REQUIRED_CAPS = (Cap.ONE_REG, Cap.ARM_PSCI_0_2, Cap.IMMEDIATE_EXIT)

__all__ = ["RAM_BASE", "RunResult", "Vm"]


_noted_no_filter = False


def _note_no_filter() -> None:
    """Once per process: what a host without the SMCCC filter means for its guests."""
    global _noted_no_filter
    if not _noted_no_filter:
        _noted_no_filter = True
        logging.getLogger(HOST_NOTES).warning(
            "this kernel's KVM (Linux %s) has no SMCCC filter: guests run with KVM's in-kernel PSCI; "
            "pyvmm's own PSCI, SDEI, custom SMCCC services and --trace smccc need Linux >= %s",
            os.uname().release, smccc_filter.MIN_KERNEL_TEXT)


class Vm:
    def __init__(self, *, cpus: int = 1, mem_mib: int = 64, ram_base: int = RAM_BASE,
                 kvm_path: str = "/dev/kvm", unhandled_mmio: str = "ignore", conduit: str = "hvc",
                 psci: bool | None = None, console: Callable[[int], None] | None = None, aarch32: bool = False,
                 reboot: bool = True, cpu: CpuOptions = AS_THE_HOST_OFFERS, irqchip: str = "auto",
                 shared_memory: bool = False) -> None:
        """`conduit`: the SMCCC conduit every service answers on (the other gets NOT_SUPPORTED).
        `psci`: True: service PSCI 1.1 in pyvmm; False: KVM's in-kernel PSCI answers, and owns
        the vCPUs' power states; None (the default): pyvmm's where the host's KVM has the SMCCC
        filter (has_smccc_filter), else KVM's. Without the filter (Linux < 6.4) whatever needs
        forwarded calls (pyvmm's PSCI, SDEI, custom services, denied ranges, the SMCCC trace, the
        SMC conduit) raises SmcccFilterUnavailableError when asked for.
        `aarch32`: the vCPUs' EL1 is AArch32 (KVM_ARM_VCPU_EL1_32BIT, kvmtool's --aarch32); their
        SMC64/HVC64 calls all get NOT_SUPPORTED (SMCCC 1.3 §5.2), so SDEI cannot be offered.
        `console`: where the serial port's output bytes go (default: stdout, a line at a time).
        `reboot`: a guest's SYSTEM_RESET restarts it within the run; False ends the run instead
        (reason "reset"), as QEMU's -no-reboot does.
        `cpu`: the optional CPU features (pyvmm/machine/cpu_features.py): by default what the host's KVM
        offers of pointer authentication, SVE, MTE and PV stolen time, as under kvmtool; `features`
        says what the vCPUs got. `irqchip`: "auto" (as kvmtool's: a vGICv3 with an ITS, else a vGICv3, else a
        vGICv2), "gicv2", "gicv3" or
        "gicv3-its" (a vGICv3 with KVM's ITS), kvmtool's --irqchip.
        `shared_memory`: guest RAM is memfds a vhost-user daemon can map (virtio-fs needs it).
        A failure here leaves nothing behind: every fd and mapping made so far is closed."""
        if cpus < 1:
            raise VmmError(f"a VM needs at least one vCPU, not {cpus}")
        if mem_mib < 1:
            raise VmmError(f"a VM needs some memory, not {mem_mib} MiB")
        machine = os.uname().machine
        if machine != "aarch64":
            raise KvmUnavailableError(
                f"pyvmm needs an arm64 host's KVM, this host is {machine} "
                "(`make demo` and `make test` run pyvmm inside an emulated arm64 host)")
        install_kick_handler()
        self._resources = ExitStack()  # what close() frees, last made first
        try:
            self._build(cpus, mem_mib << 20, ram_base, kvm_path, unhandled_mmio, conduit, psci, console, aarch32,
                        cpu, irqchip, reboot, shared_memory)
        except BaseException:
            self._resources.close()
            raise

    def _build(self, cpus: int, mem_size: int, ram_base: int, kvm_path: str, unhandled_mmio: str,
               conduit: str, psci: bool | None, console: Callable[[int], None] | None, aarch32: bool,
               cpu: CpuOptions, irqchip: str, reboot: bool, shared_memory: bool) -> None:
        """The parts in the order each needs the ones before it (arm-vgic-v3.rst, api.rst): KVM,
        the VM and its CPU features, memory, the GIC, the SMCCC dispatcher and the life cycle, the
        vCPUs, then what needs them all (the GIC's final init, the PMU, the UART, PSCI)."""
        self.aarch32, self.ram_base = aarch32, ram_base
        self._open_vm(cpus, ram_base + mem_size, kvm_path, cpu, aarch32)
        psci = self._choose_psci(psci, conduit)
        self.memory = GuestMemory(shared=shared_memory)
        self._resources.callback(self.memory.close)
        self.mmio = MmioBus()
        self.dt_parts: list[DtPart] = []  # devices that contribute a device-tree node
        self.add_memory(ram_base, mem_size)
        if self.features.pvtime:  # guest memory, but not RAM: the DT's /memory leaves it out
            self.add_memory(cpu_features.PVTIME_BASE, cpu_features.PVTIME_SIZE, ram=False)
        self.lines = InterruptLines(self.fd)
        self._resources.callback(self.lines.close)
        self.gic = Gic(self.fd, cpus, irqchip)
        self._resources.callback(self.gic.close)
        for base, size, name in self.gic.mmio_regions:
            self.add_device(base, size, InKernelRegion(), name)
        self.smccc = Dispatcher(conduit, aarch32_callers=aarch32, filter_missing=not self._has_filter)
        self.vcpus: list[Vcpu] = []  # filled below; the life cycle and the exits see them as they come
        self.lifecycle = Lifecycle(self.memory, self.lines, self.smccc, self.install_smccc_filter,
                                   vcpus=self.vcpus, gic=self.gic, reboot=reboot)
        self.unhandled_mmio = UnhandledMmio(unhandled_mmio)
        self._exits = MachineExits(self.smccc, self.mmio, self.unhandled_mmio, self.lifecycle, self.vcpus)
        self._create_vcpus(cpus, kvm_power=not psci)
        self._add_uart(console)
        self.virtio: list[VirtioMmio] = []
        self.service_context = ServiceContext(self.vcpus, self.memory, self.lifecycle, conduit, self.smccc.emit,
                                              self.lines)
        self.sdei: Sdei | None = None  # enable_sdei()
        self.psci: Psci | None = None
        self._add_psci(psci, conduit)

    def _open_vm(self, cpus: int, ram_end: int, kvm_path: str, cpu: CpuOptions, aarch32: bool) -> None:
        """/dev/kvm, what pyvmm needs of it, and the VM with the CPU features it offers."""
        self.kvm = Kvm(kvm_path)
        self._resources.callback(self.kvm.close)
        for cap in REQUIRED_CAPS:
            if not self.kvm.check_extension(cap):
                raise KvmUnavailableError(f"this KVM lacks KVM_CAP_{cap.name}, which pyvmm needs")
        max_vcpus = self.kvm.check_extension(Cap.MAX_VCPUS) or self.kvm.check_extension(Cap.NR_VCPUS)
        if cpus > max_vcpus:
            raise VmmError(f"{cpus} vCPUs requested, this KVM allows at most {max_vcpus}")
        if aarch32 and not self.kvm.check_extension(Cap.ARM_EL1_32BIT):
            raise KvmUnavailableError("this host's CPUs cannot run EL1 in AArch32 state (no KVM_CAP_ARM_EL1_32BIT), "
                                      "which an AArch32 guest needs")
        # the guest-physical address size that holds the RAM (many boards offer fewer than 40 bits)
        self.fd = self.kvm.create_vm(vm_ipa_bits(ram_end, self.kvm.check_extension(Cap.ARM_VM_IPA_SIZE)))
        self._resources.callback(self.fd.close)
        self.features = cpu_features.choose(cpu, self.fd.check_extension, aarch32=aarch32)
        if self.features.mte:  # before any vCPU exists (api.rst, KVM_CAP_ARM_MTE)
            self.fd.enable_cap(Cap.ARM_MTE)
        if self.fd.check_extension(Cap.ARM_NISV_TO_USER):
            # report MMIO accesses KVM cannot decode as KVM_EXIT_ARM_NISV instead of failing KVM_RUN
            self.fd.enable_cap(Cap.ARM_NISV_TO_USER)
        self._has_filter = smccc_filter.supported(self.fd)

    def _choose_psci(self, psci: bool | None, conduit: str) -> bool:
        """Whose PSCI: pyvmm's where KVM forwards calls (the SMCCC filter), else KVM's own."""
        # said when the guest first runs, so that a refusal (--sdei, say) stays the one line
        self._note_pending = psci is None and not self._has_filter
        if psci is None:
            psci = self._has_filter
        elif psci and not self._has_filter:
            raise smccc_filter.unavailable("pyvmm's own PSCI (Vm(psci=True))")
        if conduit == "smc" and not self._has_filter:
            # before 6.4 KVM answers every SMC with NOT_SUPPORTED itself (handle_smc), PSCI's too
            raise smccc_filter.unavailable("the SMC conduit (--psci-conduit smc)")
        return psci

    def _create_vcpus(self, cpus: int, *, kvm_power: bool) -> None:
        """The vCPUs, then what needs every one of them: the GIC's final init and the PMU."""
        target, _ = self.fd.preferred_target()
        for i in range(cpus):
            fd = self.fd.create_vcpu(i)
            self._resources.callback(fd.close)
            self.vcpus.append(Vcpu(i, fd, target, self._exits, aarch32=self.aarch32, kvm_power=kvm_power,
                                   features=self.features))
        if self.vcpus[0].kvm_offers_trng():
            self.smccc.kernel_functions[Owner.STANDARD_SECURE] = TRNG_FUNCTIONS
        if self.vcpus[0].offer_pv_time(self.features.pvtime):
            self.smccc.kernel_functions[Owner.STANDARD_HYP] = PV_TIME_FUNCTIONS
        self.gic.finalize([v.mpidr for v in self.vcpus])
        if self.features.pmu:
            for v in self.vcpus:
                v.init_pmu()
            self.dt_parts.append(cpu_features.PmuNode())

    def _add_uart(self, console: Callable[[int], None] | None) -> None:
        out = ConsoleOutput() if console is None else console
        self.console = out
        if isinstance(out, ConsoleOutput):
            self.lifecycle.on_run_end.append(out.flush)
        self.serial = SerialPort(out, self.lines.line())
        self.add_device(self.serial.base, self.serial.size, self.serial.uart, "uart", dt=self.serial)
        self.lifecycle.add_device(self.serial)

    def _add_psci(self, psci: bool, conduit: str) -> None:
        from pyvmm.services.psci import KvmPsci, Psci

        if psci:
            from pyvmm.services.std_hyp import StandardHypervisor

            self.psci = Psci(self.service_context)
            self.smccc.add_service(self.psci)
            self.smccc.add_service(StandardHypervisor())
        else:
            self.smccc.add_service(KvmPsci(conduit))

    # --- building ------------------------------------------------------------------------
    def add_memory(self, gpa: int, size: int, *, readonly: bool = False, ram: bool = True) -> None:
        """Guest memory at `gpa`; `ram`: the guest's RAM, in the DT's /memory (else memory KVM or a
        device uses, such as PV time's)."""
        if (m := self.mmio.overlaps(gpa, size)) is not None:
            raise GuestMemoryError(f"memory {gpa:#x}+{size:#x} overlaps device {m.name} at {m.base:#x}")
        region = self.memory.add(gpa, size, readonly=readonly, ram=ram)
        try:
            self.fd.set_user_memory_region(region.slot, gpa, size, region.host_addr,
                                           KVM_MEM_READONLY if readonly else 0)
        except KvmIoctlError as e:
            # before Linux 6.2, KVM takes no shared mapping for an MTE guest (kvm_arch_prepare_memory_region)
            if e.errno == errno.EINVAL and region.fd >= 0 and self.features.mte:
                raise SharedMemoryRefusedError(
                    "this kernel's KVM refuses an MTE guest the shared RAM a virtio-fs daemon needs (Linux < 6.2): "
                    "give --disable-mte, or share with --9p") from None
            raise

    def add_device(self, base: int, size: int, device: MmioDevice, name: str, dt: DtPart | None = None) -> None:
        """Put `device` on the MMIO bus; `dt`, if given, contributes its node (dt_node(phandles)).
        A device with state of its own takes part in resets with vm.lifecycle.add_device()."""
        for r in self.memory.regions:
            if r.overlaps(base, size):
                raise VmmError(f"device {name} at {base:#x}+{size:#x} overlaps guest RAM {r.gpa:#x}+{r.size:#x}")
        self.mmio.add(base, size, device, name)
        if dt is not None:
            self.dt_parts.append(dt)

    def add_virtio(self, device: VirtioDevice) -> VirtioMmio:
        """Attach a virtio device on its own virtio-mmio transport, at kvmtool's next slot
        (0x3000000 + 0x200 * n) with the next SPI, its InterruptStatus a hot register. The VM owns
        the device from here on: it is closed with the VM, or at once if it cannot be attached."""
        from pyvmm.devices.virtio.mmio_registers import INTERRUPT_STATUS, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE
        from pyvmm.devices.virtio.transport import VirtioMmio

        try:
            if self.lifecycle.ran:
                raise VmmError("add devices before the VM first runs")
            if device.needs_shared_memory and not self.memory.shared:
                raise VmmError(f"virtio-{device.name}: its daemon must reach guest RAM: build the VM with "
                               "Vm(shared_memory=True)")
            base = VIRTIO_MMIO_BASE + VIRTIO_MMIO_SIZE * len(self.virtio)
            transport = VirtioMmio(device, base, self.memory, self.lines.irqfd(), self.fd.ioeventfd, self._device_failed)
        except BaseException:
            device.close()
            raise
        self._resources.callback(transport.close)
        self.add_device(base, VIRTIO_MMIO_SIZE, transport, transport.name, dt=transport)
        self.mmio.add_hot_register(base + INTERRUPT_STATUS, transport.interrupt_status)
        self.lifecycle.add_device(transport)
        self.virtio.append(transport)
        return transport

    def add_virtio_devices(self, devices: Sequence[VirtioDevice]) -> None:
        """add_virtio() for each in turn; if one cannot be attached, the ones after it are closed
        too (the VM owns each device it was handed)."""
        for i, device in enumerate(devices):
            try:
                self.add_virtio(device)
            except BaseException:
                for rest in devices[i + 1:]:
                    rest.close()
                raise

    def _device_failed(self, message: str) -> None:
        """A device that cannot go on (its vhost-user daemon died) ends the run."""
        self.lifecycle.finish(RunResult("error", message))

    def enable_sdei(self, events: Iterable[EventSpec] = ()) -> Sdei:
        """Service SDEI 1.1 in pyvmm with event 0 and the declared platform `events`; the SDEI
        function range is forwarded from now on (before run()) and the device tree advertises
        /firmware/sdei on the VM's conduit."""
        from pyvmm.services.sdei import Sdei

        if not self._has_filter:
            raise smccc_filter.unavailable("SDEI")
        if self.psci is None:
            # SDEI follows the vCPUs' power states (a PE that CPU_ON boots is reset, one that is
            # off gets no event, SDEI 1.1 §6.2), which only pyvmm's PSCI sees
            raise VmmError("SDEI needs pyvmm's PSCI: this VM has KVM's (Vm(psci=False))")
        if self._filter_installed:
            raise VmmError("enable SDEI before the VM first runs (the SMCCC filter is fixed then)")
        if self.sdei is not None:
            raise VmmError("SDEI is already enabled on this VM")
        if self.aarch32:
            raise VmmError("SDEI cannot be offered to an AArch32 guest: its calls are all SMC64 (SDEI 1.1 §5.1)")
        self.sdei = Sdei(self.service_context, events)
        self.smccc.add_service(self.sdei)
        return self.sdei

    def attach_gdb(self, address: str, *, wait: bool = False) -> GdbServer:
        """Serve GDB's remote protocol on `address` (tcp:[HOST:]PORT, PORT 0 for a free one, or
        unix:PATH) from now until the VM is closed; the server's `address` says where. A client
        that connects stops the guest. `wait`: vCPU 0 is held before its first instruction until
        a client lets it go (QEMU's -S). See pyvmm/gdb/debugger.py."""
        from pyvmm.gdb.debugger import Debugger
        from pyvmm.gdb.monitor import Monitor
        from pyvmm.gdb.server import GdbServer
        from pyvmm.gdb.target import MachineTarget

        if self.lifecycle.ran:
            raise VmmError("attach the GDB stub before the VM first runs")
        if self._exits.debugger is not None:
            raise VmmError("this VM has a GDB stub already")
        if self.aarch32:
            raise VmmError("the GDB stub debugs AArch64 guests; this VM's vCPUs run AArch32")
        if not self.kvm.check_extension(Cap.SET_GUEST_DEBUG):
            raise KvmUnavailableError("this KVM lacks KVM_CAP_SET_GUEST_DEBUG, which the GDB stub needs")

        def set_watch(hook: Callable[..., None] | None) -> None:
            self.smccc.watch = hook

        debugger = Debugger(self.vcpus, MachineTarget(self.vcpus, self.memory),
                            hw_breakpoints=self.kvm.check_extension(Cap.GUEST_DEBUG_HW_BPS),
                            hw_watchpoints=self.kvm.check_extension(Cap.GUEST_DEBUG_HW_WPS),
                            describe_call=self.smccc.describe, set_watch=set_watch,
                            result=lambda: self.lifecycle.result)
        self._resources.callback(debugger.close)
        server = GdbServer(address, debugger, Monitor(debugger, self.smccc, lambda: self.sdei), self.stop)
        self._resources.callback(server.close)
        self._exits.debugger = debugger
        self.lifecycle.add_device(debugger)
        self.lifecycle.on_run_end.append(debugger.run_ended)
        if wait:
            debugger.hold()
        server.start()
        return server

    def load(self, data: bytes, gpa: int | None = None) -> int:
        """Copy an image into guest RAM (default: the start of RAM); returns its address. A
        reset loads it again."""
        gpa = self.ram_base if gpa is None else gpa
        if not self.memory.contains(gpa, max(len(data), 1)):
            raise GuestMemoryError(f"image of {len(data)} bytes does not fit in guest RAM at {gpa:#x}")
        self._add_image(BlobImage(gpa, bytes(data)))
        return gpa

    def load_file(self, path: str | os.PathLike[str], gpa: int | None = None) -> int:
        """Read a file straight into guest RAM (default: the start of RAM, no copy in between);
        returns its address. A reset reads it again."""
        gpa = self.ram_base if gpa is None else gpa
        size = file_size(path, "image")
        if not self.memory.contains(gpa, size):
            raise GuestMemoryError(f"image of {size} bytes does not fit in guest RAM at {gpa:#x}")
        self._add_image(file_image(path, gpa, size))
        return gpa

    def load_gzip(self, path: str | os.PathLike[str], gpa: int, offset: int = 0, length: int | None = None) -> int:
        """Unpack the gzip data at `offset` of a file (`length` bytes; None: to its end) straight into
        guest RAM at `gpa`; returns the bytes it unpacked to. A reset unpacks it again."""
        image = unpack_gzip(self.memory, os.fspath(path), gpa, offset, length)
        self.lifecycle.add_image(image)
        return image.size

    def _add_image(self, image: Image) -> None:
        image.load(self.memory)
        self.lifecycle.add_image(image)

    def set_boot(self, entry: int, x0: int = 0, more: tuple[int, ...] = ()) -> None:
        """Boot vCPU 0 at `entry` in EL1h with DAIF masked (AArch32: Supervisor mode, A, I, F
        masked), x0 = `x0` and x1, x2, ... = `more` (booting.rst)."""
        if not self.memory.contains(entry & ~1, 4):
            raise GuestMemoryError(f"entry point {entry:#x} is not in guest RAM")
        self.lifecycle.boot = Entry(entry, x0, more)
        self.vcpus[0].set_entry(self.lifecycle.boot)

    def device_tree(self, *, bootargs: str = "", initrd: tuple[int, int] | None = None,
                    stdout: str | None = None, kaslr_seed: int | None = None) -> Node:
        """The machine's device tree, assembled from its parts (see devicetree/machvirt.py)."""
        from devicetree.machvirt import machine_tree

        firmware = [node for s in self.smccc.services if (node := s.dt_node()) is not None]
        return machine_tree(cpus=[v.mpidr for v in self.vcpus],
                            memory=[(r.gpa, r.size) for r in self.memory.regions if r.ram],
                            gic=self.gic, devices=self.dt_parts, firmware=firmware, bootargs=bootargs,
                            initrd=initrd, stdout=stdout, kaslr_seed=kaslr_seed)

    @property
    def has_smccc_filter(self) -> bool:
        """Whether this host's KVM forwards SMCCC calls to pyvmm (KVM_ARM_VM_SMCCC_FILTER, Linux
        >= 6.4): pyvmm's PSCI, SDEI, custom services and the SMCCC trace need it. Without it the
        guest runs with KVM's in-kernel PSCI (pyvmm.machine.host.probe() says the same of the host)."""
        return self._has_filter

    # --- running -------------------------------------------------------------------------
    def install_smccc_filter(self) -> None:
        """Install the filter the dispatcher's routes call for (run() does this if not yet done);
        on a host without one, nothing is forwarded and registration just ends."""
        if not self._filter_installed:
            if self._has_filter:
                smccc_filter.install(self.fd, self.smccc.filter_ranges())
            self.smccc.freeze()
            self._filter_installed = True

    _filter_installed = False

    def run(self, timeout: float | None = None) -> RunResult:
        """Run until the guest powers off or fails, stop() is called, or `timeout` seconds pass
        (resets included)."""
        if self._note_pending:
            self._note_pending = False
            _note_no_filter()
        log.info("entering the guest: %d vCPUs, %d MiB", len(self.vcpus), self.memory.regions[0].size >> 20)
        return self.lifecycle.run(timeout)

    def stop(self, message: str = "stopped by request") -> None:
        """Stop a running VM from any thread."""
        self.lifecycle.stop(message)

    @property
    def resets(self) -> int:
        """How many times the guest has been reset within the run."""
        return self.lifecycle.resets

    # --- teardown ------------------------------------------------------------------------
    def close(self) -> None:
        self.lifecycle.close(self._resources)

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

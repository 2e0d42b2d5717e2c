"""`pyvmm run`: a guest from a kernel or firmware image, as kvmtool's `run` (its options, where kvmtool has them)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

from pyvmm.cli.options import (
    EXIT_ERROR,
    EXIT_GUEST,
    EXIT_OK,
    EXIT_TIMEOUT,
    SmcccOptions,
    add_machine_options,
    one_line,
    positive_float,
    sve_vector_length,
    u64,
    virtio_transport,
)
from pyvmm.cli.signals import StopSignals
from pyvmm.errors import KernelOpenError, VmmError

if TYPE_CHECKING:
    from pyvmm.devices.virtio.device import VirtioDevice
    from pyvmm.machine.cpu_features import CpuOptions
    from pyvmm.machine.lifecycle import RunResult
    from pyvmm.machine.vm import Vm
    from pyvmm.services.sdei import EventSpec


def add_parser(sub: Any) -> None:
    """This subcommand's parser, on `pyvmm`'s subparsers."""
    from pyvmm.devices.virtio.registry import CLI_DEVICES

    run = sub.add_parser("run", help="run a guest")
    image = run.add_mutually_exclusive_group(required=True)
    image.add_argument("-k", "--kernel", metavar="IMAGE", help="arm64 Linux Image to boot")
    image.add_argument("-f", "--firmware", metavar="FILE",
                       help="flat binary loaded at the start of RAM and entered at EL1h, x0 = DTB")
    run.add_argument("-i", "--initrd", metavar="FILE", help="initial ramdisk for the kernel")
    run.add_argument("-p", "--params", default="", metavar="PARAMS", help="kernel command line")
    run.add_argument("--nodefaults", action="store_true",
                     help="the kernel's command line is -p's alone: no console= added (kvmtool's option)")
    run.add_argument("--kaslr-seed", type=u64, metavar="N",
                     help="/chosen/kaslr-seed in the device tree (default: a random one each boot)")
    for device_type in CLI_DEVICES:  # each virtio device type declares its own options
        device_type.add_arguments(run)
    run.add_argument("--virtio-transport", type=virtio_transport, default="mmio", metavar="mmio",
                     help="kvmtool's transport for virtio devices; pyvmm's are virtio-mmio (version 2)")
    run.add_argument("--dump-dtb", metavar="FILE", help="write the generated device tree to FILE and exit")
    add_machine_options(run, cpus=1, mem=64)
    # the CPU and the interrupt controller, in kvmtool's spelling (pyvmm/machine/cpu_features.py)
    # irqchip.IRQCHIPS, spelled out: parsing loads no KVM module (tests/unit/test_cli.py checks)
    run.add_argument("--irqchip", choices=["auto", "gicv2", "gicv3", "gicv3-its"], default="auto",
                     help="the vGIC; auto (as kvmtool): gicv3-its where KVM has an ITS, else gicv3, else gicv2")
    run.add_argument("--pmu", action="store_true", help="give the guest the host's PMU (PMUv3, interrupt PPI 7)")
    run.add_argument("--sve-max-vl", type=sve_vector_length, metavar="BITS",
                     help="SVE's longest vector (a power of two, 128-2048; default: the host's longest)")
    run.add_argument("--disable-mte", action="store_true", help="no MTE, which the guest gets where KVM offers it")
    run.add_argument("--no-pvtime", action="store_true",
                     help="no PV stolen time, which the guest gets where KVM offers it")
    run.add_argument("--aarch32", action="store_true",
                     help="run the guest in AArch32 state (an AArch32 kernel or firmware; no SDEI)")
    run.add_argument("--sdei", action="store_true",
                     help="service SDEI 1.1 (event 0 plus --sdei-event ones) and advertise it in the DT")
    run.add_argument("--sdei-event", action="append", default=[], metavar="N[,shared][,critical]",
                     help="declare platform SDEI event N (private and normal unless told); repeatable")
    run.add_argument("--control", metavar="SOCKET",
                     help="listen on this Unix socket for `pyvmm sdei` and `pyvmm stop`")
    run.add_argument("--timeout", type=positive_float, metavar="S", help="stop the guest after S seconds")
    run.add_argument("--gdb", metavar="tcp:[HOST:]PORT|unix:PATH",
                     help="serve GDB's remote protocol there (target remote HOST:PORT); HOST defaults to 127.0.0.1")
    run.add_argument("--gdb-wait", action="store_true",
                     help="hold vCPU 0 before its first instruction until GDB attaches and continues")
    run.set_defaults(handler=cmd_run)


class HostConsole:
    """The host side of the guest's console for devices made from the command line: the UART
    unless a device takes it (--console virtio)."""

    def __init__(self) -> None:
        from pyvmm.machine.host_console import ConsoleOutput

        self.output = ConsoleOutput()
        self.receive: Callable[[bytes], None] | None = None  # None: the UART's
        self.kernel_name = "ttyS0"

    def console_output(self, data: bytes) -> None:
        self.output.write(data)

    def use_console(self, receive: Callable[[bytes], None], kernel_name: str) -> None:
        self.receive, self.kernel_name = receive, kernel_name


def cpu_options(args: argparse.Namespace) -> CpuOptions:
    """kvmtool's CPU flags as the Python API's CpuOptions: None is "as the host offers"."""
    from pyvmm.machine.cpu_features import CpuOptions

    return CpuOptions(sve_max_vl=args.sve_max_vl, pmu=args.pmu, mte=False if args.disable_mte else None,
                      pvtime=False if args.no_pvtime else None)


def cmd_run(args: argparse.Namespace, signals: StopSignals) -> int:
    services = SmcccOptions(args)
    events = _check_options(args)
    host = HostConsole()
    vm, devices = _make_vm(args, host)
    # From here a signal stops the VM, as it would a running one, rather than unwinding its
    # set-up: the rest of the set-up finishes (no file is left half-written, no socket unlisted)
    # and the run that follows ends at once. The handlers outlive the VM: a signal while it closes
    # (disk images are fsynced then) is one more stop request, and a second SIGINT still ends
    # pyvmm at once.
    signals.stop_with(vm.stop)
    with ExitStack() as after_close, vm:
        dtb = _set_up(vm, args, devices, services, events, host)
        if args.dump_dtb:
            _write(args.dump_dtb, dtb)
            if signals.received is not None:
                print(f"pyvmm: {signals.message()}", file=sys.stderr)
                return 128 + signals.received
            return EXIT_OK
        result = _serve_and_run(vm, args, host, after_close)
    return _exit(result, signals)


def _check_options(args: argparse.Namespace) -> list[EventSpec]:
    """What the options say wrong of themselves, before any VM is made; the SDEI events."""
    if args.sdei_event and not args.sdei:
        raise VmmError("--sdei-event declares SDEI events: add --sdei")
    if args.sdei and args.aarch32:
        raise VmmError("--sdei needs an AArch64 guest: SDEI's calls are all SMC64, which AArch32 callers cannot make")
    events = []
    if args.sdei_event:  # what only some options need (SDEI, GDB) is imported only for them
        from pyvmm.services.sdei import parse_event

        events = [parse_event(e) for e in args.sdei_event]
    if args.control:
        from pyvmm.sockets import claim

        claim(args.control)
    if args.gdb_wait and not args.gdb:
        raise VmmError("--gdb-wait waits for GDB: add --gdb tcp:[HOST:]PORT or --gdb unix:PATH")
    if args.gdb:
        from pyvmm.gdb.server import parse_address

        kind, where = parse_address(args.gdb)
        if kind == "unix":
            from pyvmm.sockets import claim

            claim(where, "--gdb")
    return events


def _make_vm(args: argparse.Namespace, host: HostConsole) -> tuple[Vm, list[VirtioDevice]]:
    """The devices first, as kvmtool parses every option before touching KVM: a bad -d or -n is
    reported as such on any host; until the VM owns them they are closed here on any failure."""
    from pyvmm.devices.virtio.registry import CLI_DEVICES
    from pyvmm.machine.vm import Vm

    with ExitStack() as unowned:
        devices: list[VirtioDevice] = []
        for device_type in CLI_DEVICES:
            for device in device_type.from_args(args, host):
                unowned.callback(device.close)
                devices.append(device)
        vm = Vm(cpus=args.cpus, mem_mib=args.mem, conduit=args.psci_conduit, console=host.output,
                aarch32=args.aarch32, cpu=cpu_options(args), irqchip=args.irqchip,
                shared_memory=any(d.needs_shared_memory for d in devices))
        unowned.pop_all()
    return vm, devices


def _set_up(vm: Vm, args: argparse.Namespace, devices: list[VirtioDevice], services: SmcccOptions,
            events: list[EventSpec], host: HostConsole) -> bytes:
    """Devices, SMCCC services, SDEI and the images into the VM; the device tree it boots with."""
    from pyvmm.boot.load import boot

    vm.add_virtio_devices(devices)  # the VM closes them from here on
    # the images once the machine exists, as kvmtool loads them: an option this host cannot
    # honour is said before a kernel that cannot be opened (see KernelOpenError)
    if args.kernel is not None and not os.path.isfile(args.kernel):
        raise KernelOpenError(f"Unable to open kernel {args.kernel}: it does not exist or is not a file")
    for what, path in (("firmware", args.firmware), ("initrd", args.initrd)):
        if path is not None and not os.path.isfile(path):
            raise VmmError(f"{what} {path} does not exist or is not a file")
    if args.sdei and not vm.has_smccc_filter:
        from pyvmm.smccc import filter as smccc_filter

        raise smccc_filter.unavailable("--sdei")
    services.apply(vm)
    if args.sdei:
        vm.enable_sdei(events)
    return boot(vm, kernel=args.kernel, firmware=args.firmware, initrd=args.initrd, cmdline=args.params,
                console=None if args.nodefaults else host.kernel_name, kaslr_seed=args.kaslr_seed)


def _write(path: str, dtb: bytes) -> None:
    try:
        with open(path, "wb") as f:
            f.write(dtb)
    except OSError as e:
        raise VmmError(f"cannot write {path}: {e.strerror}") from None


def _serve_and_run(vm: Vm, args: argparse.Namespace, host: HostConsole, after_close: ExitStack) -> RunResult:
    """The GDB stub, the console's input and the control socket, then the run."""
    from pyvmm.machine.host_console import ConsoleInput

    if args.gdb:
        stub = vm.attach_gdb(args.gdb, wait=args.gdb_wait)
        held = "; vCPU 0 waits for it" if args.gdb_wait else ""
        print(f"pyvmm: GDB stub listening on {stub.address}{held}", file=sys.stderr, flush=True)
    receive = host.receive or vm.serial.uart.receive
    console_in = ConsoleInput(receive, lambda: vm.stop("quit from the console (Ctrl-A x)"), host.output.flush)
    if args.control:
        from pyvmm.cli.control import ControlServer

        control = ControlServer(args.control, vm.stop, vm.sdei)
        after_close.callback(control.close)  # before the VM's own close: no request reaches it then
        control.start()
    console_in.start()
    try:
        return vm.run(timeout=args.timeout)
    finally:
        console_in.stop()


def _exit(result: RunResult, signals: StopSignals) -> int:
    """The run's exit status (see pyvmm/cli/__init__.py), said in one line unless 0."""
    from pyvmm.machine.lifecycle import threads_left_running

    if signals.received is not None and result.reason == "stopped" and result.message == signals.message():
        status = 128 + signals.received
    else:
        status = EXIT_OK if result.reason == "poweroff" else {"timeout": EXIT_TIMEOUT, "error": EXIT_ERROR}.get(
            result.reason, EXIT_GUEST)
    if status != EXIT_OK:
        print(one_line(f"pyvmm: guest ended: {result}"), file=sys.stderr)
    if threads_left_running():
        # a thread that would not stop (a service handler that never returns) is running user
        # code: do not tear the interpreter down under it, leave now with the run's status
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status

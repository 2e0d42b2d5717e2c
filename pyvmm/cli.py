"""pyvmm's command line, in kvmtool's spelling where kvmtool has the option.

  pyvmm run (-k IMAGE [-i INITRD] [-p PARAMS] | -f FIRMWARE) [-c CPUS] [-m MiB]
            [--psci-conduit hvc|smc] [--service FILE]... [--replace-service FILE]... [--deny RANGE]...
            [--sdei [--sdei-event N[,shared][,critical]]...] [--control SOCKET]
            [--console serial|virtio] [-d FILE[,ro][,nolock]]... [--rng] [-n mode=tap,tapif=NAME|mode=none]...
            [--trace smccc] [--dump-dtb FILE] [--timeout S] [--gdb tcp:[HOST:]PORT|unix:PATH [--gdb-wait]]
  pyvmm exec [-k IMAGE [--modules DIR]] [-c CPUS] [-m MiB] [-p PARAMS] [--rwdir DIR]... [--cwd DIR]
             [--env NAME[=VALUE]]... [--console-log FILE] [--timeout S] [SMCCC options] -- CMD [ARG...]
                                                       run a host command in a Linux guest whose root
                                                       is the host's, read-only over virtio-9p
  pyvmm sdei signal --control SOCKET EVENT [--cpu N]   raise an SDEI event in a running VM
  pyvmm sdei status --control SOCKET                   its SDEI events and PE masks
  pyvmm stop --control SOCKET                          stop a running VM
  pyvmm check                                          what this host's KVM offers
  pyvmm --version

Exit status of `run`: 0 when the guest powers off; 1 on an error; 2 for bad usage; 3 when the
guest crashes, halts (every vCPU off) or is stopped; 124 when --timeout expires; 128 + N when
signal N (SIGTERM, SIGINT, SIGHUP) stopped it. A guest's PSCI SYSTEM_RESET restarts it within
the same run.
Exit status of `exec`: the command's (0-255; 128 + N when signal N killed it); pyvmm's own are
123 when the guest never ran the command (the kernel, its modules, a share or the working
directory failed: the message says which), 124 when --timeout expires, 125 when pyvmm could not
start the guest (bad options, no KVM, a bad kernel), 128 + N when signal N stopped pyvmm.
Every failure is one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any, NoReturn

from pyvmm.errors import KernelOpenError, VmmError

if TYPE_CHECKING:
    from pyvmm.devices.virtio.device import VirtioDevice
    from pyvmm.machine.cpu_features import CpuOptions
    from pyvmm.machine.vm import Vm

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_GUEST, EXIT_TIMEOUT = 0, 1, 2, 3, 124
EXIT_EXEC_PYVMM = 125  # exec: pyvmm could not start the guest (execute.EXIT_PYVMM_FAILED)
MAX_SECONDS = 1e8  # a --timeout of over three years is a mistake, and beyond threading.TIMEOUT_MAX one


def one_line(message: str) -> str:
    """An error message as one line, whatever the user's values in it hold: line breaks and other
    unprintable characters are shown escaped, as repr() would show them."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)


class Parser(argparse.ArgumentParser):
    usage_status = EXIT_USAGE  # `exec` keeps 2 for its command: its own usage errors are 125

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Options are taken as spelled in full, never abbreviated: argparse's prefix matching
        # differs between Pythons (3.11 matches "--=" against every option, 3.13 does not), and a
        # script that works on one must work on all
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        print(one_line(f"{self.prog}: error: {message} (see {self.prog} --help)"), file=sys.stderr)
        raise SystemExit(self.usage_status)


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer (decimal or 0x...) of at least `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} must be at least {minimum}")
        return value

    return parse


positive_int, natural_int = int_at_least(1), int_at_least(0)


def u64(text: str) -> int:
    """An argparse type: an integer (decimal or 0x...) that fits in 64 bits."""
    value = natural_int(text)
    if value >= 1 << 64:
        raise argparse.ArgumentTypeError(f"{text!r} does not fit in 64 bits")
    return value


MEM_UNITS = {"": 20, "b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50}  # kvmtool's: no unit is MiB


def mem_mib(text: str) -> int:
    """An argparse type: a RAM size in whole MiB, as kvmtool's -m takes it (a number with an
    optional unit B, K, M, G, T or P, either case; no unit means MiB)."""
    number, unit = text.rstrip("bBkKmMgGtTpP"), text[len(text.rstrip("bBkKmMgGtTpP")):].lower()
    if not number.isdigit() or unit not in MEM_UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (a number of MiB, or with a unit: 512M, 2G)")
    size = int(number) << MEM_UNITS[unit]
    if size < 1 << 20 or size % (1 << 20):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of MiB")
    return size >> 20


def sve_vector_length(text: str) -> int:
    """An argparse type: kvmtool's --sve-max-vl, in bits."""
    from pyvmm.machine.cpu_features import check_sve_max_vl

    value = positive_int(text)
    try:
        return check_sve_max_vl(value)
    except VmmError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= MAX_SECONDS:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"{text!r} must be positive and at most {MAX_SECONDS:g} (seconds)")
    return value


def build_parser() -> Parser:
    from pyvmm import __version__
    from pyvmm.devices.virtio import CLI_DEVICES

    # kvm-unit-tests' runner takes a binary for a kvmtool when its --help says "The most commonly
    # used" on stdout (scripts/arch-run.bash, search_kvmtool_binary), as kvmtool's help does
    p = Parser(prog="pyvmm", formatter_class=argparse.RawDescriptionHelpFormatter,
               description="A kvmtool-style arm64 VMM in Python.\n\nThe most commonly used pyvmm commands are:")
    p.add_argument("--version", action="version", version=f"pyvmm {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
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
    run.add_argument("--dump-dtb", metavar="FILE", help="write the generated device tree to FILE and exit")
    add_machine_options(run, cpus=1, mem=64)
    # the CPU and the interrupt controller, in kvmtool's spelling (pyvmm/machine/cpu_features.py)
    # irqchip.IRQCHIPS, spelled out: parsing loads no KVM module (tests/unit/test_cli.py checks)
    run.add_argument("--irqchip", choices=["auto", "gicv2", "gicv3", "gicv3-its"], default="auto",
                     help="the vGIC: gicv3 (else gicv2) by default; gicv3-its adds KVM's ITS")
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
    ex = sub.add_parser("exec", help="run a host command in a Linux guest on the host's root",
                        description="Boot a Linux guest whose root is the host's (read-only, virtio-9p) and run "
                                    "CMD in it; its stdout and stderr are pyvmm's, its status pyvmm's status.")
    ex.usage_status = EXIT_EXEC_PYVMM
    ex.add_argument("-k", "--kernel", metavar="IMAGE",
                    help="arm64 Linux kernel (Image, gzip Image or EFI zboot; default /boot/vmlinuz-$(uname -r))")
    ex.add_argument("--modules", metavar="DIR",
                    help="its modules' tree (default: /lib/modules/RELEASE, RELEASE read from the kernel)")
    ex.add_argument("-p", "--params", default="", metavar="PARAMS", help="more kernel command line")
    ex.add_argument("--rwdir", action="append", default=[], metavar="DIR",
                    help="make host directory DIR writable in the guest (at the same path); repeatable")
    ex.add_argument("--cwd", metavar="DIR", help="the command's directory (default: the current one)")
    ex.add_argument("--env", action="append", default=[], metavar="NAME[=VALUE]",
                    help="pass an environment variable (beyond PATH, HOME, TERM, LANG, LC_* and a few more)")
    ex.add_argument("--console-log", metavar="FILE", help="write the kernel's console to FILE")
    ex.add_argument("--timeout", type=positive_float, metavar="S", help="give up after S seconds (status 124)")
    add_machine_options(ex, cpus=1, mem=512)
    ex.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]")
    sdei = sub.add_parser("sdei", help="talk to a running VM's SDEI (see run --control)")
    action = sdei.add_subparsers(dest="action", required=True, parser_class=Parser)
    signal = action.add_parser("signal", help="raise an SDEI event")
    signal.add_argument("--control", required=True, metavar="SOCKET")
    signal.add_argument("event", type=natural_int, help="the event number")
    signal.add_argument("--cpu", type=natural_int, help="the target vCPU of a private event")
    status = action.add_parser("status", help="show every SDEI event's state")
    status.add_argument("--control", required=True, metavar="SOCKET")
    stop = sub.add_parser("stop", help="stop a running VM (see run --control)")
    stop.add_argument("--control", required=True, metavar="SOCKET")
    sub.add_parser("check", help="report what this host's KVM offers pyvmm")
    return p


def add_machine_options(p: argparse.ArgumentParser, *, cpus: int, mem: int) -> None:
    """The options `run` and `exec` share: the machine and its SMCCC services."""
    p.add_argument("-c", "--cpus", type=positive_int, default=cpus, help=f"number of vCPUs (default {cpus})")
    p.add_argument("-m", "--mem", type=mem_mib, default=mem, metavar="SIZE",
                   help=f"RAM, in MiB or with a unit as in 512M, 2G (default {mem} MiB)")
    p.add_argument("--psci-conduit", choices=["hvc", "smc"], default="hvc",
                   help="the SMCCC conduit of PSCI and every other service (default hvc)")
    p.add_argument("--service", action="append", default=[], metavar="FILE",
                   help="add an SMCCC service from a Python file (RANGE, handle(call)); repeatable")
    p.add_argument("--replace-service", action="append", default=[], metavar="FILE",
                   help="like --service, replacing whatever serves that range (e.g. PSCI)")
    p.add_argument("--deny", action="append", default=[], metavar="RANGE",
                   help="have KVM answer NOT_SUPPORTED for BASE+COUNT or FIRST-LAST; repeatable")
    p.add_argument("--trace", choices=["smccc"], action="append", default=[],
                   help="smccc: print every forwarded SMCCC call, strace-style, on stderr")
    p.add_argument("--loglevel", choices=["debug", "info", "warning", "error"], default="warning")


class Interrupted(BaseException):
    """A stop signal that came before there was a machine to stop: it unwinds the set-up, as the
    KeyboardInterrupt it stands in for would, so that what was made is closed on the way out."""

    def __init__(self, signo: int) -> None:
        super().__init__(signo)
        self.signo = signo


class StopSignals:
    """SIGTERM, SIGINT and SIGHUP from pyvmm's first instant: main() installs them before it does
    anything else. Until a command hands over its machine (stop_with), a signal unwinds the
    set-up (Interrupted). From then on it stops the machine the way `pyvmm stop` does: every
    vCPU and device ends, disk images are flushed and closed. Either way pyvmm exits with 128 +
    the signal's number. A second SIGINT while it is stopping ends pyvmm at once (the user
    insists). A signal the user had ignored (nohup, a background job) stays ignored; the old
    handlers come back at the end."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self) -> None:
        self._stop: Callable[[str], None] | None = None
        self.received: int | None = None
        self._deferring = False
        self._pending = False  # a signal that came while deferring, not acted on yet
        self._saved = {signo: signal.getsignal(signo) for signo in self.SIGNALS}
        for signo, old in self._saved.items():
            if old is not signal.SIG_IGN:
                signal.signal(signo, self._handle)

    def stop_with(self, stop: Callable[[str], None]) -> None:
        """From now on a signal calls `stop`, on a thread of its own."""
        self._stop = stop

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """A signal waits until the block has ended, for a step that must not be cut in half (one
        that writes files and removes them if it fails); the block may hand over its machine
        (stop_with), which the signal then stops."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
            if self._pending:  # also when the block failed: the signal came first, it decides
                self._pending = False
                self._act()

    def message(self) -> str | None:
        return None if self.received is None else f"stopped by {signal.Signals(self.received).name}"

    def _handle(self, signo: int, frame: object) -> None:
        if self.received is None:
            self.received = signo
            if self._deferring:
                self._pending = True
            else:
                self._act()
        elif signo == signal.SIGINT:
            sys.stderr.flush()
            os._exit(128 + signo)

    def _act(self) -> None:
        assert self.received is not None
        if self._stop is None:
            raise Interrupted(self.received)
        # not here: the handler runs between two bytecodes of the main thread, which may hold the
        # locks stop() takes
        threading.Thread(target=self._stop, args=(self.message(),), name="stop", daemon=True).start()

    def restore(self) -> None:
        for signo, old in self._saved.items():
            signal.signal(signo, old)


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


class SmcccOptions:
    """--service, --replace-service, --deny and --trace: loaded and checked before any VM is
    made, applied to one once it is."""

    def __init__(self, args: argparse.Namespace) -> None:
        from pyvmm.services.modules import load_service_module, parse_range

        self.added = [load_service_module(f) for f in args.service]
        self.replacing = [load_service_module(f) for f in args.replace_service]
        self.denied = [parse_range(r) for r in args.deny]
        self.trace = "smccc" in args.trace

    def apply(self, vm: Vm) -> None:
        from pyvmm.smccc import filter as smccc_filter
        from pyvmm.smccc.trace import TracePrinter

        if not vm.has_smccc_filter:
            asked = [option for option, given in (("--service", self.added), ("--replace-service", self.replacing),
                                                  ("--deny", self.denied), ("--trace smccc", self.trace)) if given]
            if asked:
                raise smccc_filter.unavailable(" and ".join(asked))
        for m in self.added:
            vm.smccc.register(m.base, m.size, m.handle, m.name)
        for m in self.replacing:
            vm.smccc.replace(m.base, m.size, m.handle, m.name)
        for base, size in self.denied:
            vm.smccc.deny(base, size, "--deny")
        if self.trace:
            vm.smccc.trace = TracePrinter(sys.stderr)


def cpu_options(args: argparse.Namespace) -> CpuOptions:
    """kvmtool's CPU flags as the Python API's CpuOptions: None is "as the host offers"."""
    from pyvmm.machine.cpu_features import CpuOptions

    return CpuOptions(sve_max_vl=args.sve_max_vl, pmu=args.pmu, mte=False if args.disable_mte else None,
                      pvtime=False if args.no_pvtime else None)


def cmd_run(args: argparse.Namespace, signals: StopSignals) -> int:
    # what only some options need (a control socket, SDEI, GDB) is imported only for them
    from pyvmm.boot.load import boot
    from pyvmm.devices.virtio import CLI_DEVICES
    from pyvmm.machine.host_console import ConsoleInput
    from pyvmm.machine.lifecycle import threads_left_running
    from pyvmm.machine.vm import Vm

    services = SmcccOptions(args)
    if args.sdei_event and not args.sdei:
        raise VmmError("--sdei-event declares SDEI events: add --sdei")
    if args.sdei and args.aarch32:
        raise VmmError("--sdei needs an AArch64 guest: SDEI's calls are all SMC64, which AArch32 callers cannot make")
    events = []
    if args.sdei_event:
        from pyvmm.services.sdei import parse_event

        events = [parse_event(e) for e in args.sdei_event]
    if args.control:
        from pyvmm.control import claim as claim_control_path

        claim_control_path(args.control)
    if args.gdb_wait and not args.gdb:
        raise VmmError("--gdb-wait waits for GDB: add --gdb tcp:[HOST:]PORT or --gdb unix:PATH")
    if args.gdb:
        from pyvmm.gdb.server import parse_address

        kind, where = parse_address(args.gdb)
        if kind == "unix":
            from pyvmm.control import claim as claim_control_path

            claim_control_path(where, "--gdb")
    host = HostConsole()
    # the devices first, as kvmtool parses every option before touching KVM: a bad -d or -n is
    # reported as such on any host; until the VM owns them they are closed here on any failure
    with ExitStack() as unowned:
        devices: list[VirtioDevice] = []
        for device_type in CLI_DEVICES:
            for device in device_type.from_args(args, host):
                unowned.callback(device.close)
                devices.append(device)
        vm = Vm(cpus=args.cpus, mem_mib=args.mem, conduit=args.psci_conduit, console=host.output,
                aarch32=args.aarch32, cpu=cpu_options(args), irqchip=args.irqchip)
        unowned.pop_all()
    # From here a signal stops the VM, as it would a running one, rather than unwinding its
    # set-up: the rest of the set-up finishes (no file is left half-written, no socket unlisted)
    # and the run that follows ends at once. The handlers outlive the VM: a signal while it closes
    # (disk images are fsynced then) is one more stop request, and a second SIGINT still ends
    # pyvmm at once.
    signals.stop_with(vm.stop)
    with ExitStack() as after_close, vm:
        for i, device in enumerate(devices):
            try:
                vm.add_virtio(device)  # the VM closes it from here on, or at once if it cannot attach
            except BaseException:
                for rest in devices[i + 1:]:
                    rest.close()
                raise
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
        dtb = boot(vm, kernel=args.kernel, firmware=args.firmware, initrd=args.initrd, cmdline=args.params,
                   console=None if args.nodefaults else host.kernel_name, kaslr_seed=args.kaslr_seed)
        if args.dump_dtb:
            try:
                with open(args.dump_dtb, "wb") as f:
                    f.write(dtb)
            except OSError as e:
                raise VmmError(f"cannot write {args.dump_dtb}: {e.strerror}") from None
            if signals.received is not None:
                print(f"pyvmm: {signals.message()}", file=sys.stderr)
                return 128 + signals.received
            return EXIT_OK
        if args.gdb:
            stub = vm.attach_gdb(args.gdb, wait=args.gdb_wait)
            held = "; vCPU 0 waits for it" if args.gdb_wait else ""
            print(f"pyvmm: GDB stub listening on {stub.address}{held}", file=sys.stderr, flush=True)
        receive = host.receive or vm.serial.uart.receive
        console_in = ConsoleInput(receive, lambda: vm.stop("quit from the console (Ctrl-A x)"), host.output.flush)
        if args.control:
            from pyvmm.control import ControlServer

            control = ControlServer(args.control, vm.stop, vm.sdei)
            after_close.callback(control.close)  # before the VM's own close: no request reaches it then
            control.start()
        console_in.start()
        try:
            result = vm.run(timeout=args.timeout)
        finally:
            console_in.stop()
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


def cmd_exec(args: argparse.Namespace, signals: StopSignals) -> int:
    """`pyvmm exec`: its statuses are the command's, or 123/124/125/128+N (see the module doc)."""
    from pyvmm.exec.session import (
        EXIT_BOOT_FAILED,
        EXIT_PYVMM_FAILED,
        GuestFailed,
        GuestTimedOut,
        LinuxSession,
        chosen_env,
        visible_in_guest,
        write_all,
    )

    command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if args.loglevel == "warning":
        # exec's stderr is the command's: what the host's shape means (no SMCCC filter) is left to
        # `pyvmm check`, and what it refuses is still one line (a --service there, say)
        from pyvmm.machine.vm import HOST_NOTES

        logging.getLogger(HOST_NOTES).setLevel(logging.ERROR)
    if not command:
        print("pyvmm exec: error: no command given (pyvmm exec [options] -- CMD [ARG...])", file=sys.stderr)
        return EXIT_PYVMM_FAILED
    try:
        services = SmcccOptions(args)
        env = chosen_env(args.env)
        rwdirs = [os.path.realpath(d) for d in args.rwdir]
        if args.cwd is not None:
            cwd = os.path.realpath(args.cwd)
            if not os.path.isdir(cwd) or not visible_in_guest(cwd, rwdirs):
                raise VmmError(f"--cwd {args.cwd} is not a directory the guest sees (the guest has its own "
                               "/tmp, /run, /var/tmp: share it with --rwdir)")
        else:  # the current directory, unless the guest's tmpfs hides it: then /
            here = os.path.realpath(os.getcwd())
            cwd = here if visible_in_guest(here, rwdirs) else "/"
        if args.kernel is not None and not os.path.isfile(args.kernel):
            raise VmmError(f"kernel {args.kernel} does not exist or is not a file")
        started = time.monotonic()
        # the session writes its initramfs and a folder of its own, and removes them if it fails:
        # a signal meanwhile waits for it, then stops it
        with signals.deferred():
            session = LinuxSession(kernel=args.kernel, modules=args.modules, rwdirs=rwdirs, cpus=args.cpus,
                                   mem_mib=args.mem, params=args.params, console_log=args.console_log,
                                   conduit=args.psci_conduit, stdout=write_all(1), stderr=write_all(2),
                                   configure=services.apply)
            signals.stop_with(session.stop)
    except VmmError as e:
        print(one_line(f"pyvmm: error: {e}"), file=sys.stderr)
        return EXIT_PYVMM_FAILED

    def left() -> float | None:
        return None if args.timeout is None else max(0.0, started + args.timeout - time.monotonic())

    try:
        session.start(timeout=left())
        status = session.run(command, env=env, cwd=cwd, timeout=left()).status
    except GuestTimedOut:
        print(f"pyvmm: timed out after {args.timeout:g} s", file=sys.stderr)
        session.stop("--timeout")
        status = EXIT_TIMEOUT
    except GuestFailed as e:
        if signals.received is not None:
            status = 128 + signals.received
        else:
            print(one_line(f"pyvmm: the guest did not run the command: {e}"), file=sys.stderr)
            status = EXIT_BOOT_FAILED
    except VmmError as e:
        print(one_line(f"pyvmm: error: {e}"), file=sys.stderr)
        status = EXIT_PYVMM_FAILED
    finally:
        session.close()
    if signals.received is not None:
        status = 128 + signals.received
    return status


def cmd_sdei(args: argparse.Namespace) -> int:
    from pyvmm.control import request

    if args.action == "signal":
        reply = request(args.control, {"cmd": "sdei-signal", "event": args.event, "cpu": args.cpu})
        if not reply["pending"]:
            print(f"pyvmm: SDEI event {args.event} dropped: the guest has not registered it", file=sys.stderr)
            return EXIT_ERROR
        return EXIT_OK
    reply = request(args.control, {"cmd": "sdei-status"})
    masked = ", ".join(f"vcpu{i} {'masked' if m else 'unmasked'}" for i, m in enumerate(reply["masked"]))
    print(f"PEs: {masked}")
    for e in reply["events"]:
        kind = "critical" if e["critical"] else "normal"
        bound = f" INTID {e['interrupt']}" if e["interrupt"] is not None else ""
        pending = " pending" if e["pending"] else ""
        print(f"event {e['event']:<6} {e['where']:<7} {kind:<8} {e['state']}{pending}{bound}")
    return EXIT_OK


def cmd_stop(args: argparse.Namespace) -> int:
    from pyvmm.control import request

    request(args.control, {"cmd": "stop"})
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    """The host's shape and, in words, what pyvmm can and cannot do on it (pyvmm/machine/host.py)."""
    from pyvmm.machine.host import probe, report, runnable

    uname = os.uname()
    if uname.machine != "aarch64":
        print(f"kernel          {uname.release} {uname.machine}")
        print(f"pyvmm runs guests on arm64 hosts with KVM; this host is {uname.machine}. "
              "`make demo` and `make test` run pyvmm inside an emulated arm64 host here.")
        return EXIT_ERROR
    shape = probe()
    for line in report(shape):
        print(line)
    return EXIT_OK if runnable(shape) else EXIT_ERROR


def main(argv: list[str] | None = None) -> int:
    # the signal handlers first: a SIGTERM a moment after pyvmm started (while it imports, builds
    # the VM, loads images) ends it with 128 + N and one line, having closed what it made
    signals = StopSignals() if threading.current_thread() is threading.main_thread() else None
    try:
        return command(argv, signals)
    except Interrupted as e:
        print(f"pyvmm: stopped by {signal.Signals(e.signo).name} before the guest ran", file=sys.stderr)
        return 128 + e.signo
    finally:
        if signals is not None:
            signals.restore()


def command(argv: list[str] | None, signals: StopSignals | None) -> int:
    """main() with its signal handlers in place (None: called from a thread that cannot have them)."""
    parser = build_parser()
    given = sys.argv[1:] if argv is None else argv
    if given[:1] == ["exec"]:  # whichever parser finds the mistake, exec's usage errors are 125
        parser.usage_status = EXIT_EXEC_PYVMM
    args, unknown = parser.parse_known_args(given)
    if unknown:  # an option `exec` does not know is its usage error (125), anything else 2
        if args.command == "exec":
            print(one_line(f"pyvmm exec: error: unrecognized arguments: {' '.join(unknown)} "
                           "(see pyvmm exec --help; the command goes after --)"), file=sys.stderr)
            return EXIT_EXEC_PYVMM
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(level=getattr(logging, getattr(args, "loglevel", "warning").upper()),
                        format="pyvmm: %(message)s")
    try:
        if args.command in ("run", "exec"):
            if signals is None:
                raise VmmError(f"pyvmm {args.command} runs a machine: call it from the main thread, "
                               "which alone can take the stop signals")
            return (cmd_run if args.command == "run" else cmd_exec)(args, signals)
        commands = {"sdei": cmd_sdei, "stop": cmd_stop, "check": cmd_check}
        return commands[args.command](args)
    except VmmError as e:
        print(one_line(f"pyvmm: {e.label}: {e}"), file=sys.stderr)
        return EXIT_EXEC_PYVMM if args.command == "exec" else EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # a pyvmm bug: still one line, unless asked for the traceback
        if os.environ.get("PYVMM_DEBUG"):
            raise
        print(one_line(f"pyvmm: internal error: {type(e).__name__}: {e} (PYVMM_DEBUG=1 shows where)"), file=sys.stderr)
        return EXIT_EXEC_PYVMM if args.command == "exec" else EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())

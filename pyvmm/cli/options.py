"""What every subcommand shares: exit statuses, the parser class and its argument types, the machine and SMCCC options of `run` and `exec`, and one-line errors."""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

from pyvmm.errors import VmmError

if TYPE_CHECKING:
    from pyvmm.machine.vm import Vm
    from pyvmm.services.modules import ServiceModule


EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_GUEST, EXIT_TIMEOUT = 0, 1, 2, 3, 124
EXIT_EXEC_PYVMM = 125  # exec: pyvmm could not start the guest (execute.EXIT_PYVMM_FAILED)
MAX_SECONDS = 1e8  # a --timeout of over three years is a mistake, and beyond threading.TIMEOUT_MAX one


def one_line(message: str) -> str:
    """An error message as one line, whatever the user's values in it hold: line breaks and other
    unprintable characters are shown escaped, as repr() would show them."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)


def terminal_columns() -> int:
    """The terminal's width as shutil.get_terminal_size() finds it: $COLUMNS, else the width of
    the terminal stdout is, else 80."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0 and sys.__stdout__ is not None:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):  # not a terminal, or no longer open
            pass
    return columns if columns > 0 else 80


class Parser(argparse.ArgumentParser):
    usage_status = EXIT_USAGE  # `exec` keeps 2 for its command: its own usage errors are 125

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Options are taken as spelled in full, never abbreviated: argparse's prefix matching
        # differs between Pythons (3.11 matches "--=" against every option, 3.13 does not), and a
        # script that works on one must work on all
        kwargs.setdefault("allow_abbrev", False)
        # The help's width given to argparse's formatter, which would otherwise ask shutil, and
        # shutil loads bz2 and lzma for its archives: about 0.8 MiB resident in every run
        formatter = kwargs.get("formatter_class", argparse.HelpFormatter)
        kwargs["formatter_class"] = functools.partial(formatter, width=terminal_columns() - 2)  # argparse's - 2
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


# kvmtool's --virtio-transport values (kvmtool's builtin-run.c). pyvmm's devices sit on virtio-mmio
# version 2 (virtio 1.2 §4.2.2): kvmtool's "mmio". A legacy or PCI transport is not offered.
VIRTIO_TRANSPORTS = ("pci", "pci-legacy", "mmio", "mmio-legacy")


def virtio_transport(text: str) -> str:
    """An argparse type: kvmtool's --virtio-transport, of which pyvmm has "mmio"."""
    if text == "mmio":
        return text
    if text in VIRTIO_TRANSPORTS:
        raise argparse.ArgumentTypeError(f"pyvmm's virtio devices are on virtio-mmio (version 2) only: give mmio, "
                                         f"not {text}")
    raise argparse.ArgumentTypeError(f"{text!r} is not one of kvmtool's transports ({', '.join(VIRTIO_TRANSPORTS)})")


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= MAX_SECONDS:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"{text!r} must be positive and at most {MAX_SECONDS:g} (seconds)")
    return value


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


class SmcccOptions:
    """--service, --replace-service, --deny and --trace: loaded and checked before any VM is
    made, applied to one once it is."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.added: list[ServiceModule] = []
        self.replacing: list[ServiceModule] = []
        self.denied: list[tuple[int, int]] = []
        self.trace = "smccc" in args.trace
        if args.service or args.replace_service or args.deny:  # the loader only for the options that need it
            from pyvmm.services.modules import load_service_module, parse_range

            self.added = [load_service_module(f) for f in args.service]
            self.replacing = [load_service_module(f) for f in args.replace_service]
            self.denied = [parse_range(r) for r in args.deny]

    def apply(self, vm: Vm) -> None:
        from pyvmm.smccc import filter as smccc_filter

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
            from pyvmm.smccc.trace import TracePrinter  # --trace smccc's alone

            vm.smccc.trace = TracePrinter(sys.stderr)

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

import importlib
import signal
import sys
import threading
from typing import TYPE_CHECKING, Any

from pyvmm.cli.signals import Interrupted, StopSignals

if TYPE_CHECKING:
    from pyvmm.cli.app import build_parser, command
    from pyvmm.cli.cmd_run import cpu_options
    from pyvmm.cli.options import (
        EXIT_ERROR,
        EXIT_EXEC_PYVMM,
        EXIT_GUEST,
        EXIT_OK,
        EXIT_TIMEOUT,
        EXIT_USAGE,
        SmcccOptions,
        mem_mib,
        one_line,
    )

__all__ = ["EXIT_ERROR", "EXIT_EXEC_PYVMM", "EXIT_GUEST", "EXIT_OK", "EXIT_TIMEOUT", "EXIT_USAGE", "Interrupted",
           "SmcccOptions", "StopSignals", "build_parser", "command", "cpu_options", "main", "mem_mib", "one_line"]


def main(argv: list[str] | None = None) -> int:
    """The `pyvmm` command. Its stop signals are taken before anything else is imported (only the
    standard library's signal and threading are loaded by then): a SIGTERM a moment after pyvmm
    started (while it imports, builds the VM, loads images) ends it with 128 + N and one line,
    having closed what it made."""
    signals = StopSignals() if threading.current_thread() is threading.main_thread() else None
    try:
        from pyvmm.cli import app

        return app.command(argv, signals)
    except Interrupted as e:
        print(f"pyvmm: stopped by {signal.Signals(e.signo).name} before the guest ran", file=sys.stderr)
        return 128 + e.signo
    finally:
        if signals is not None:
            signals.restore()


# what scripts and tests use of the command line, from the modules that have it, loaded when
# first asked for (PEP 562) so that main() takes its signals first
_LAZY = {"build_parser": "pyvmm.cli.app", "command": "pyvmm.cli.app", "cpu_options": "pyvmm.cli.cmd_run",
         **{name: "pyvmm.cli.options" for name in ("EXIT_ERROR", "EXIT_EXEC_PYVMM", "EXIT_GUEST", "EXIT_OK",
                                                  "EXIT_TIMEOUT", "EXIT_USAGE", "SmcccOptions", "mem_mib",
                                                  "one_line")}}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pyvmm.cli' has no attribute {name!r}")

"""`pyvmm exec`: a host command in a Linux guest whose root is the host's."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import TYPE_CHECKING, Any

from pyvmm.cli.options import (
    EXIT_EXEC_PYVMM,
    EXIT_TIMEOUT,
    SmcccOptions,
    add_machine_options,
    one_line,
    positive_float,
)
from pyvmm.cli.signals import StopSignals
from pyvmm.errors import VmmError

if TYPE_CHECKING:
    from pyvmm.exec.session import LinuxSession


def add_parser(sub: Any) -> None:
    """This subcommand's parser, on `pyvmm`'s subparsers."""
    ex = sub.add_parser("exec", help="run a host command in a Linux guest on the host's root",
                        description="Boot a Linux guest whose root is the host's (read-only, virtio-fs or virtio-9p) and run "
                                    "CMD in it; its stdout and stderr are pyvmm's, its status pyvmm's status.")
    ex.usage_status = EXIT_EXEC_PYVMM
    ex.add_argument("-k", "--kernel", metavar="IMAGE",
                    help="arm64 Linux kernel (Image, gzip Image or EFI zboot; default /boot/vmlinuz-$(uname -r))")
    ex.add_argument("--modules", metavar="DIR",
                    help="its modules' tree (default: /lib/modules/RELEASE, RELEASE read from the kernel)")
    ex.add_argument("-p", "--params", default="", metavar="PARAMS", help="more kernel command line")
    ex.add_argument("--rwdir", action="append", default=[], metavar="DIR",
                    help="make host directory DIR writable in the guest (at the same path); repeatable")
    ex.add_argument("--share", choices=("auto", "9p", "fs"), default="auto",
                    help="how the host's files reach the guest: fs (virtio-fs through virtiofsd), 9p, or auto "
                         "(virtio-fs where virtiofsd is installed; `pyvmm check` says which)")
    ex.add_argument("--cwd", metavar="DIR", help="the command's directory (default: the current one)")
    ex.add_argument("--env", action="append", default=[], metavar="NAME[=VALUE]",
                    help="pass an environment variable (beyond PATH, HOME, TERM, LANG, LC_* and a few more)")
    ex.add_argument("--console-log", metavar="FILE", help="write the kernel's console to FILE")
    ex.add_argument("--timeout", type=positive_float, metavar="S", help="give up after S seconds (status 124)")
    add_machine_options(ex, cpus=1, mem=512)
    ex.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]")
    ex.set_defaults(handler=cmd_exec)


def cmd_exec(args: argparse.Namespace, signals: StopSignals) -> int:
    """`pyvmm exec`: its statuses are the command's, or 123/124/125/128+N (see the module doc)."""
    from pyvmm.exec.session import (
        EXIT_PYVMM_FAILED,
        LinuxSession,
        chosen_env,
        write_all,
    )

    command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if args.loglevel == "warning":
        # exec's stderr is the command's: what the host's shape means (no SMCCC filter) is left to
        # `pyvmm check`, and what it refuses is still one line (a --service there, say)
        from pyvmm.machine.host import HOST_NOTES

        logging.getLogger(HOST_NOTES).setLevel(logging.ERROR)
    if not command:
        print("pyvmm exec: error: no command given (pyvmm exec [options] -- CMD [ARG...])", file=sys.stderr)
        return EXIT_PYVMM_FAILED
    try:
        services = SmcccOptions(args)
        env = chosen_env(args.env)
        rwdirs = [os.path.realpath(d) for d in args.rwdir]
        cwd = _working_directory(args.cwd, rwdirs)
        if args.kernel is not None and not os.path.isfile(args.kernel):
            raise VmmError(f"kernel {args.kernel} does not exist or is not a file")
        started = time.monotonic()
        # the session writes its initramfs and a folder of its own, and removes them if it fails:
        # a signal meanwhile waits for it, then stops it
        with signals.deferred():
            session = LinuxSession(kernel=args.kernel, modules=args.modules, rwdirs=rwdirs, cpus=args.cpus,
                                   mem_mib=args.mem, params=args.params, console_log=args.console_log,
                                   conduit=args.psci_conduit, stdout=write_all(1), stderr=write_all(2),
                                   configure=services.apply, share=args.share)
            signals.stop_with(session.stop)
    except VmmError as e:
        print(one_line(f"pyvmm: error: {e}"), file=sys.stderr)
        return EXIT_PYVMM_FAILED

    return _run(session, command, env, cwd, args.timeout, started, signals)


def _run(session: LinuxSession, command: list[str], env: dict[str, str], cwd: str, timeout: float | None,
         started: float, signals: StopSignals) -> int:
    """The command in the session's guest, within what is left of --timeout; its status."""
    from pyvmm.exec.session import EXIT_BOOT_FAILED, EXIT_PYVMM_FAILED, GuestFailed, GuestTimedOut

    def left() -> float | None:
        return None if timeout is None else max(0.0, started + timeout - time.monotonic())

    try:
        session.start(timeout=left())
        status = session.run(command, env=env, cwd=cwd, timeout=left()).status
    except GuestTimedOut:
        print(f"pyvmm: timed out after {timeout:g} s", file=sys.stderr)
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


def _working_directory(asked: str | None, rwdirs: list[str]) -> str:
    """The command's directory: --cwd, which the guest must see; else the current one, unless the
    guest's own tmpfs hides it (then /)."""
    from pyvmm.exec.session import visible_in_guest

    if asked is not None:
        cwd = os.path.realpath(asked)
        if not os.path.isdir(cwd) or not visible_in_guest(cwd, rwdirs):
            raise VmmError(f"--cwd {asked} is not a directory the guest sees (the guest has its own "
                           "/tmp, /run, /var/tmp: share it with --rwdir)")
        return cwd
    here = os.path.realpath(os.getcwd())
    return here if visible_in_guest(here, rwdirs) else "/"

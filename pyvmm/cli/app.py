"""The command line's entry point: the parser, each subcommand's options, and main()."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

import pyvmm.cli.cmd_check as cmd_check
import pyvmm.cli.cmd_exec as cmd_exec
import pyvmm.cli.cmd_run as cmd_run
import pyvmm.cli.cmd_sdei as cmd_sdei
import pyvmm.cli.cmd_stop as cmd_stop
from pyvmm.cli.options import (
    EXIT_ERROR,
    EXIT_EXEC_PYVMM,
    Parser,
    one_line,
)
from pyvmm.cli.signals import StopSignals
from pyvmm.errors import VmmError

# Each subcommand is a module of its own: its parser and options (add_parser), and the
# function that runs it, which add_parser names as the parser's `handler`
SUBCOMMANDS = (cmd_run, cmd_exec, cmd_sdei, cmd_stop, cmd_check)


def build_parser() -> Parser:
    from pyvmm import __version__

    # kvm-unit-tests' runner takes a binary for a kvmtool when its --help says "The most commonly
    # used" on stdout (scripts/arch-run.bash, search_kvmtool_binary), as kvmtool's help does
    p = Parser(prog="pyvmm", formatter_class=argparse.RawDescriptionHelpFormatter,
               description="A kvmtool-style arm64 VMM in Python.\n\nThe most commonly used pyvmm commands are:")
    p.add_argument("--version", action="version", version=f"pyvmm {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    for subcommand in SUBCOMMANDS:  # each adds its own parser and options
        subcommand.add_parser(sub)
    return p


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
        handler: Callable[[argparse.Namespace, StopSignals | None], int] = args.handler
        return handler(args, signals)
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


"""`pyvmm stop`: stop a running VM through its control socket."""

from __future__ import annotations

import argparse
from typing import Any

from pyvmm.cli.options import EXIT_OK


def add_parser(sub: Any) -> None:
    """This subcommand's parser, on `pyvmm`'s subparsers."""
    stop = sub.add_parser("stop", help="stop a running VM (see run --control)")
    stop.add_argument("--control", required=True, metavar="SOCKET")
    stop.set_defaults(handler=cmd_stop)


def cmd_stop(args: argparse.Namespace, signals: object = None) -> int:
    from pyvmm.cli.control import request

    request(args.control, {"cmd": "stop"})
    return EXIT_OK

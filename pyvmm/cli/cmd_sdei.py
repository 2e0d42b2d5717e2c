"""`pyvmm sdei signal|status`: a running VM's SDEI, through its control socket."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pyvmm.cli.options import EXIT_ERROR, EXIT_OK, Parser, natural_int


def add_parser(sub: Any) -> None:
    """This subcommand's parser, on `pyvmm`'s subparsers."""
    sdei = sub.add_parser("sdei", help="talk to a running VM's SDEI (see run --control)")
    action = sdei.add_subparsers(dest="action", required=True, parser_class=Parser)
    signal = action.add_parser("signal", help="raise an SDEI event")
    signal.add_argument("--control", required=True, metavar="SOCKET")
    signal.add_argument("event", type=natural_int, help="the event number")
    signal.add_argument("--cpu", type=natural_int, help="the target vCPU of a private event")
    status = action.add_parser("status", help="show every SDEI event's state")
    status.add_argument("--control", required=True, metavar="SOCKET")
    sdei.set_defaults(handler=cmd_sdei)


def cmd_sdei(args: argparse.Namespace, signals: object = None) -> int:
    from pyvmm.cli.control import request

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

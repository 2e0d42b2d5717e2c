"""Emulated arm64 KVM host: `python3 tools/armhost {build|run} ...`.

  build                 fetch Debian's arm64 kernel, Python and wheels; pack the base initramfs
  run [opts] -- CMD...  boot the host once and run CMD in the checkout copy inside it; exit with
                        CMD's status (124 on time-out, 125 if the host died without reporting)
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from boot import run  # noqa: E402
from image import HostImage  # noqa: E402

CHECKOUT = Path(__file__).resolve().parents[2]


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="armhost", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=CHECKOUT / ".cache" / "armhost")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build")
    r = sub.add_parser("run")
    r.add_argument("--cpus", type=int, default=2)
    r.add_argument("--mem", type=int, default=3072, help="MiB")
    r.add_argument("--timeout", type=float, default=1200.0, help="seconds for the whole boot")
    r.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)

    for tool in ("qemu-system-aarch64", "cpio", "dpkg-deb", "apt-get"):
        if shutil.which(tool) is None:
            print(f"armhost: {tool} not found (run `make host-deps`)", file=sys.stderr)
            return 2
    command = getattr(args, "command", [])
    command = command[1:] if command[:1] == ["--"] else command
    if args.cmd == "run" and not command:
        print("armhost: run needs a command after --", file=sys.stderr)
        return 2
    image = HostImage(args.cache)
    image.build()
    if args.cmd == "build":
        return 0
    return run(image.kernel, image.base, CHECKOUT, command, cpus=args.cpus, mem_mib=args.mem,
               timeout=args.timeout)


if __name__ == "__main__":
    # A failed step exits with its own one-line message (steps.run_step); what is left here (a full
    # disk, a missing file, Ctrl-C) also ends with one line instead of a traceback.
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        print("armhost: interrupted", file=sys.stderr)
        sys.exit(130)
    except OSError as e:
        print(f"armhost: {e}", file=sys.stderr)
        sys.exit(1)

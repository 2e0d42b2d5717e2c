"""Emulated arm64 KVM host: `python3 tools/armhost [--shape NAME] {build|run|matrix} ...`.

  build                 fetch Debian's arm64 kernel, Python and wheels; pack the base initramfs
  run [opts] -- CMD...  boot the host once and run CMD in the checkout copy inside it; exit with
                        CMD's status (124 on time-out, 125 if the host died without reporting)
  matrix [--shapes A,B] [opts] -- CMD...
                        for each shape in turn (all by default): build it if needed, boot it
                        once and run CMD as `run` does; then one line per shape with CMD's status
                        and its last `kvm: ` line. Exits 0 only if CMD succeeded in every shape

The host's userspace (busybox, Python, GDB) is Debian's, of the release whose Python runs this
(3.11: bookworm, 3.13: trixie; image.py), so that its bytecode is compiled here. Shapes (--shape,
default `default`), each a QEMU machine and a Debian kernel package that the host and its L2
guests both run, the same on every machine:
  default   GICv3, 4K pages, bookworm-backports' linux-image-arm64 (Linux 6.12)
  gicv2     the same kernel on a GICv2 (so its KVM offers only a vGICv2)
  16k       GICv3, bookworm-backports' linux-image-arm64-16k (16K pages)
  linux6.1  GICv3, bookworm's own linux-image-arm64 (Linux 6.1)
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from boot import run  # noqa: E402
from image import HostImage  # noqa: E402
from shapes import SHAPES, Shape  # noqa: E402
from steps import log  # noqa: E402

CHECKOUT = Path(__file__).resolve().parents[2]
SHAPE_LINE = "KVM tier ran against real /dev/kvm"  # tests/conftest.py, with the shape it probed
KVM_LINE = "kvm: "  # the KVM tier's tally (tests/conftest.py); matrix reports each shape's last one
STATUS_WORDS = {124: "time limit", 125: "the host stopped without reporting a status"}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="armhost", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=CHECKOUT / ".cache" / "armhost")
    ap.add_argument("--shape", help="the host shape for build and run (default: default)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build")
    boot_opts = argparse.ArgumentParser(add_help=False)
    boot_opts.add_argument("--cpus", type=int, default=2)
    boot_opts.add_argument("--mem", type=int, default=3072, help="MiB")
    boot_opts.add_argument("--timeout", type=float, default=1200.0, help="seconds for each whole boot")
    boot_opts.add_argument("command", nargs=argparse.REMAINDER)
    sub.add_parser("run", parents=[boot_opts])
    m = sub.add_parser("matrix", parents=[boot_opts])
    m.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated (default: all, in this order: "
                   + ", ".join(SHAPES) + ")")
    args = ap.parse_args(argv)

    if args.cmd == "matrix" and args.shape is not None:
        print("armhost: matrix takes --shapes A,B,..., not --shape", file=sys.stderr)
        return 2
    names = args.shapes.split(",") if args.cmd == "matrix" else [args.shape or "default"]
    for name in names:
        if name not in SHAPES:
            print(f"armhost: unknown shape {name!r} (shapes: {', '.join(SHAPES)})", file=sys.stderr)
            return 2
    shapes = [SHAPES[name] for name in names]
    for tool in ("qemu-system-aarch64", "cpio", "dpkg-deb", "apt-get"):
        if shutil.which(tool) is None:
            print(f"armhost: {tool} not found (run `make host-deps`)", file=sys.stderr)
            return 2
    command = getattr(args, "command", [])
    command = command[1:] if command[:1] == ["--"] else command
    if args.cmd in ("run", "matrix") and not command:
        print(f"armhost: {args.cmd} needs a command after --", file=sys.stderr)
        return 2
    if args.cmd == "matrix":
        return matrix(shapes, args.cache, command, cpus=args.cpus, mem_mib=args.mem, timeout=args.timeout)
    image = HostImage(args.cache, shapes[0])
    image.build()
    if args.cmd == "build":
        return 0
    return run(shapes[0], image.kernel, image.base, CHECKOUT, command, cpus=args.cpus, mem_mib=args.mem,
               timeout=args.timeout)


class LastKvmLine:
    """Keeps the last line of a run's output that is the KVM tier's tally, and the host's shape
    as the tier found it ("... real /dev/kvm (Linux ...; vGICv2, 4K pages, SMCCC filter present):")."""

    def __init__(self) -> None:
        self.line: str | None = None
        self.found: str | None = None

    def see(self, line: str) -> None:
        if line.startswith(KVM_LINE):
            self.line = line
        elif line.startswith(SHAPE_LINE) and "; " in line:
            self.found = line.rsplit("; ", 1)[1].removesuffix("):")


def matrix(shapes: list[Shape], cache: Path, command: list[str], *, cpus: int, mem_mib: int,
           timeout: float) -> int:
    summary = []
    for i, shape in enumerate(shapes, 1):
        log(f"matrix: shape {shape.name} ({i} of {len(shapes)})")
        image = HostImage(cache, shape)
        tally = LastKvmLine()
        why = None
        try:
            image.build()
        except (SystemExit, OSError) as e:
            # a failed build step (steps.run_step) has said what failed; it fails this shape
            # only, and the other shapes still run
            message = e.code if isinstance(e, SystemExit) else f"armhost: {e}"
            if isinstance(message, str):
                print(message, file=sys.stderr, flush=True)
            status, why = 1, "build failed"
        else:
            status = run(shape, image.kernel, image.base, CHECKOUT, command, cpus=cpus, mem_mib=mem_mib,
                         timeout=timeout, on_line=tally.see)
            why = STATUS_WORDS.get(status)
            # a row counts only if its host was the shape it is named for (a QEMU that ignored
            # gic-version, a kernel package that resolved to another page size, ...)
            if tally.found is not None and tally.found != shape.expected():
                status, why = 1, f"the host was {tally.found}, not {shape.expected()}"
                tally.line = None
        kernel = image.kernel_package() or shape.kernel_choice()
        outcome = (f"status {status}: {tally.line}" if tally.line is not None
                   else f"no {KVM_LINE.strip()} line (status {status}{': ' + why if why else ''})")
        found = f"; found {tally.found}" if tally.found is not None else ""
        summary.append((status, f"armhost: shape {shape.name} (QEMU gic-version={shape.gic}, kernel {kernel}{found}): "
                                f"{outcome}"))
    for _, line in summary:
        print(line, flush=True)
    return 0 if all(status == 0 for status, _ in summary) else 1


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

"""Guest payloads from AArch64 assembly: GNU as + objcopy, with a cache of what they built.

A payload is a `.S` file assembled into a flat binary:
`as -I DIR... [--defsym SMC=1] [--defsym NAME=VALUE]... -o x.o FILE` then `objcopy -O binary`,
and also linked where pyvmm loads it (`ld -Ttext=0x80000000`) into an ELF file beside the
binary, with its symbols, for GDB. The conduit is the `SMC` symbol (pyvmm.inc's `firmware_call`
makes an SMC when it is defined, an HVC otherwise), so one source serves both conduits. An
AArch32 payload (for a VM made with aarch32=True) is assembled by binutils for arm and includes
pyvmm32.inc instead.

Every build lands in a cache directory, named by a hash of everything that goes into it: the
source's bytes, the bytes of each file it names in an `.include` or `.incbin` line (followed
through included files), the defined symbols and the conduit. No path is part of the key, so a
checkout copied elsewhere (the emulated arm64 host, which has Python but no assembler) finds
the builds made on the machine that has binutils. Where the assembler is missing and the cache
has no build, the error says how to make one:

    python -m pyvmm.testing.payload build --cache DIR [--conduit smc] FILE.S...

The cross prefix is `aarch64-linux-gnu-` off arm64 and none on it; PYVMM_CROSS_COMPILE
overrides it (e.g. `aarch64-none-elf-`). AArch32 payloads use `arm-linux-gnueabihf-` everywhere.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from pyvmm.errors import VmmError

CACHE_ENV = "PYVMM_PAYLOAD_CACHE"
CROSS_ENV = "PYVMM_CROSS_COMPILE"
DEFAULT_CACHE = Path("build") / "pyvmm-payloads"
# pyvmm.inc (AArch64) and pyvmm32.inc (AArch32): FN_REPORT, firmware_call, report, system_off, ...
# (always on the include path)
INCLUDE_DIR = Path(__file__).resolve().parent / "include"
CONDUITS = ("hvc", "smc")
ARCHES = ("aarch64", "aarch32")
AARCH32_PREFIX = "arm-linux-gnueabihf-"
LOAD_ADDRESS = 0x8000_0000  # where pyvmm loads a payload: the start of RAM (pyvmm/machine/memory.py)
KEY_VERSION = 2  # bump when what goes into a build changes (options, layout of the key, outputs)
ASSEMBLE_TIME_LIMIT = 120  # seconds for as, ld or objcopy on one file
TOOL_LINES_SHOWN = 4  # of a failing tool's messages

# GNU as does not run the C preprocessor on a file it is given directly, and on AArch64 a line
# starting with # is a comment to it: such a line would be dropped without a word
_CPP_LINE = re.compile(rb"^[ \t]*#[ \t]*(include|define|if|ifdef|ifndef|undef|elif|else|endif)\b", re.MULTILINE)
_DIRECTIVE = re.compile(rb'^[ \t]*\.(include|incbin)[ \t]+"([^"\n]+)"', re.MULTILINE)
_SYMBOL = re.compile(r"[A-Za-z_.$][A-Za-z0-9_.$]*")


class PayloadError(VmmError):
    pass


def cross_prefix(arch: str = "aarch64") -> str:
    if arch == "aarch32":
        return AARCH32_PREFIX
    prefix = os.environ.get(CROSS_ENV)
    if prefix is not None:
        return prefix
    return "" if platform.machine() == "aarch64" else "aarch64-linux-gnu-"


def _search_path(source: Path, include_dirs: Sequence[Path]) -> list[Path]:
    """Where `.include "NAME"` is looked for, in the order the assembler looks: as runs in the
    source's directory (a name is first tried as given, from there), then each -I directory."""
    return [source.parent, *include_dirs, INCLUDE_DIR]


def _find(name: str, search: Sequence[Path]) -> Path | None:
    if os.path.isabs(name):
        return Path(name) if os.path.isfile(name) else None
    for d in search:
        if (d / name).is_file():
            return d / name
    return None


def included_files(source: Path, include_dirs: Sequence[Path] = ()) -> list[tuple[str, bytes]]:
    """(name as written, contents) of every file `source` names in an `.include` or `.incbin`
    line, and those the included files name in turn, each once. A name found nowhere is left
    out: the assembler reports it."""
    search = _search_path(source, include_dirs)
    seen: dict[str, bytes] = {}
    todo = [source.read_bytes()]
    while todo:
        for match in _DIRECTIVE.finditer(todo.pop()):
            kind, name = match.group(1), os.fsdecode(match.group(2))
            if name in seen:
                continue
            found = _find(name, search)
            if found is None:
                continue
            seen[name] = data = found.read_bytes()
            if kind == b"include":  # an .incbin blob names no further files
                todo.append(data)
    return sorted(seen.items())


def check_defsyms(defsyms: Mapping[str, int]) -> None:
    for name, value in defsyms.items():
        if not _SYMBOL.fullmatch(name) or name == "SMC":
            why = "is set by the conduit" if name == "SMC" else "is not an assembler symbol name"
            raise PayloadError(f"--defsym {name!r} {why}")
        if not isinstance(value, int) or isinstance(value, bool):
            raise PayloadError(f"--defsym {name}: the value must be an integer, not {value!r}")


def payload_key(source: Path, *, conduit: str = "hvc", defsyms: Mapping[str, int] | None = None,
                include_dirs: Sequence[Path] = (), arch: str = "aarch64") -> str:
    """The hex SHA-256 that names a build of `source`: independent of where the files are."""
    if conduit not in CONDUITS:
        raise PayloadError(f"the conduit is 'hvc' or 'smc', not {conduit!r}")
    if arch not in ARCHES:
        raise PayloadError(f"the architecture is 'aarch64' or 'aarch32', not {arch!r}")
    defsyms = dict(defsyms or {})
    check_defsyms(defsyms)
    try:
        text = source.read_bytes()
        includes = included_files(source, include_dirs)
    except OSError as e:
        raise PayloadError(f"cannot read payload source {source}: {e.strerror}") from None
    digest = hashlib.sha256
    description = {
        "version": KEY_VERSION,
        "source": digest(text).hexdigest(),
        "includes": [[name, digest(data).hexdigest()] for name, data in includes],
        "defsyms": sorted(defsyms.items()),
        "conduit": conduit,
        "arch": arch,
    }
    return digest(json.dumps(description, sort_keys=True).encode()).hexdigest()


def build_command(source: Path, cache: Path, conduit: str, defsyms: Mapping[str, int],
                  include_dirs: Sequence[Path], arch: str = "aarch64") -> str:
    """The command line that pre-builds exactly this build of `source` into `cache`."""
    argv = ["python3", "-m", "pyvmm.testing.payload", "build", "--cache", _shown(cache)]
    if conduit != "hvc":
        argv += ["--conduit", conduit]
    if arch != "aarch64":
        argv += ["--arch", arch]
    for d in include_dirs:
        argv += ["-I", _shown(d)]
    for name, value in sorted(defsyms.items()):
        argv += ["--defsym", f"{name}={value}"]
    return shlex.join([*argv, _shown(source)])


def _shown(path: Path) -> str:
    """A path as the user would type it here: relative to the current directory when inside it."""
    try:
        return os.path.relpath(path) if Path(path).resolve().is_relative_to(Path.cwd()) else str(path)
    except (OSError, ValueError):
        return str(path)


class PayloadCache:
    """Builds of `.S` payloads in one directory, made on demand where binutils are installed."""

    def __init__(self, directory: str | os.PathLike[str], include_dirs: Iterable[str | os.PathLike[str]] = ()) -> None:
        self.directory = Path(directory)
        self.include_dirs = [Path(d) for d in include_dirs]

    def path_for(self, source: str | os.PathLike[str], *, conduit: str = "hvc",
                 defsyms: Mapping[str, int] | None = None, arch: str = "aarch64") -> Path:
        """Where the build of `source` with these settings is (or would be) in the cache; its ELF
        file is the same path with `.elf` for `.bin`."""
        src = Path(source)
        key = payload_key(src, conduit=conduit, defsyms=defsyms, include_dirs=self.include_dirs, arch=arch)
        tag = conduit if arch == "aarch64" else f"{arch}-{conduit}"
        return self.directory / f"{src.stem}-{tag}-{key[:20]}.bin"

    def build(self, source: str | os.PathLike[str], *, conduit: str = "hvc",
              defsyms: Mapping[str, int] | None = None, arch: str = "aarch64") -> tuple[Path, bool]:
        """The flat binary of `source`: (path, True) when it was assembled now, (path, False)
        when the cache had it. PayloadError when it has to be assembled and cannot be."""
        src = Path(source)
        if not src.is_file():
            raise PayloadError(f"payload source {src} does not exist")
        if (cpp := _CPP_LINE.search(src.read_bytes())) is not None:
            line = src.read_bytes()[:cpp.start()].count(b"\n") + 1
            raise PayloadError(f"{_shown(src)}:{line}: a C preprocessor line, which GNU as would take for a comment: "
                               "use .include, .equ and .if instead")
        defsyms = dict(defsyms or {})
        out = self.path_for(src, conduit=conduit, defsyms=defsyms, arch=arch)
        if out.is_file() and out.with_suffix(".elf").is_file():
            return out, False
        prefix = cross_prefix(arch)
        tools = [f"{prefix}as", f"{prefix}ld", f"{prefix}objcopy"]
        missing = [t for t in tools if shutil.which(t) is None]
        if missing:
            package = "binutils-arm-linux-gnueabihf" if arch == "aarch32" else \
                f"binutils{'-aarch64-linux-gnu' if prefix else ''}"
            raise PayloadError(
                f"cannot assemble {_shown(src)}: {_listed(missing)} not found on this host, and the payload "
                f"cache {_shown(self.directory)} has no build of it for {conduit} ({out.name}); build it where GNU "
                f"binutils for {'AArch32' if arch == 'aarch32' else 'AArch64'} are installed (Debian: {package}) "
                f"with: {build_command(src, self.directory, conduit, defsyms, self.include_dirs, arch)}")
        self._assemble(src, out, tools, conduit, defsyms)
        return out, True

    def _assemble(self, src: Path, out: Path, tools: list[str], conduit: str, defsyms: dict[str, int]) -> None:
        assembler, linker, objcopy = tools
        args = [assembler]
        for d in [*self.include_dirs, INCLUDE_DIR]:
            args += ["-I", str(d.resolve())]
        symbols = ({"SMC": 1} if conduit == "smc" else {}) | defsyms
        for name, value in symbols.items():
            args += ["--defsym", f"{name}={value}"]
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PayloadError(f"cannot create the payload cache {self.directory}: {e.strerror}") from None
        # a private directory next to the results, then renames, the binary last: a reader
        # (another pytest worker) that finds the binary finds the whole of both
        with tempfile.TemporaryDirectory(prefix=".build-", dir=self.directory) as tmp:
            where = Path(tmp).resolve()  # the assembler runs in the source's directory
            obj, elf, flat = where / "payload.o", where / "payload.elf", where / "payload.bin"
            # the flat binary comes from the object, position independent as the payload is
            # written; the ELF is linked at the load address, so GDB's symbols match the guest
            for argv in ([*args, "-o", str(obj), str(src.resolve())],
                         [linker, f"-Ttext={LOAD_ADDRESS:#x}", "-o", str(elf), str(obj)],
                         [objcopy, "-O", "binary", str(obj), str(flat)]):
                _tool(argv, src, conduit)
            os.replace(elf, out.with_suffix(".elf"))
            os.replace(flat, out)


def _listed(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def _tool(argv: list[str], src: Path, conduit: str) -> None:
    try:
        p = subprocess.run(argv, cwd=src.parent, capture_output=True, text=True, timeout=ASSEMBLE_TIME_LIMIT)
    except subprocess.TimeoutExpired:
        raise PayloadError(f"{argv[0]} did not finish with {_shown(src)} in {ASSEMBLE_TIME_LIMIT} s") from None
    if p.returncode != 0:
        # the tool's own messages (file:line: Error: ...) are what the user needs: the first
        # few, on the one line, and how many more there were
        lines = [line for line in p.stderr.strip().splitlines() if line]
        detail = " | ".join(lines[:TOOL_LINES_SHOWN]) or f"status {p.returncode}"
        if len(lines) > TOOL_LINES_SHOWN:
            detail += f" | ... and {len(lines) - TOOL_LINES_SHOWN} more lines"
        raise PayloadError(f"{argv[0]} failed on {_shown(src)} ({conduit}): {detail}")


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def _defsym(text: str) -> tuple[str, int]:
    name, eq, value = text.partition("=")
    try:
        return name, int(value, 0) if eq else 1
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give NAME=VALUE with an integer VALUE") from None


def _copy_out(path: Path, output: Path) -> None:
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, output)
        shutil.copyfile(path.with_suffix(".elf"), output.with_suffix(".elf"))
    except OSError as e:
        raise PayloadError(f"cannot write {output}: {e.strerror}") from None


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pyvmm.testing.payload", allow_abbrev=False,
                                 description="Assemble guest payloads into pyvmm's payload cache, so that a host "
                                             "without an assembler (the emulated arm64 host) runs them from there.")
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="assemble FILEs (each for every conduit asked for) into the cache")
    b.add_argument("--cache", type=Path, default=None,
                   help=f"the cache directory (default: ${CACHE_ENV}, else {DEFAULT_CACHE} here); the pytest plugin's "
                        "default is build/pyvmm-payloads under pytest's rootdir")
    b.add_argument("--conduit", choices=(*CONDUITS, "both"), default="both",
                   help="build for HVC, SMC, or both (default)")
    b.add_argument("--arch", choices=ARCHES, default="aarch64",
                   help="aarch64 (default), or aarch32 for a VM made with --aarch32")
    b.add_argument("-o", dest="output", type=Path, default=None, metavar="FILE",
                   help="also copy the build to FILE, and its ELF file to FILE with .elf for its suffix "
                        "(one FILE and one conduit)")
    b.add_argument("-I", dest="include_dirs", action="append", type=Path, default=[], metavar="DIR",
                   help="a directory .include looks in (as the plugin's pyvmm_include_dirs)")
    b.add_argument("--defsym", action="append", type=_defsym, default=[], metavar="NAME=VALUE")
    b.add_argument("files", nargs="+", type=Path, metavar="FILE")
    args = ap.parse_args(argv)
    cache = PayloadCache(args.cache or default_cache_dir(), args.include_dirs)
    conduits = CONDUITS if args.conduit == "both" else (args.conduit,)
    if args.output is not None and (len(args.files) != 1 or len(conduits) != 1):
        ap.error("-o takes one FILE and one --conduit")
    try:
        for src in args.files:
            for conduit in conduits:
                path, made = cache.build(src, conduit=conduit, defsyms=dict(args.defsym), arch=args.arch)
                print(f"{src} ({conduit}): {path}{'' if made else ' (cached)'}")
                if args.output is not None:
                    _copy_out(path, args.output)
    except PayloadError as e:
        print(f"pyvmm.testing.payload: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Commands in a Linux guest whose root is the host's: `pyvmm exec` and LinuxSession.

The guest boots a kernel (the host's own by default) with pyvmm's initramfs (initramfs.py) and
these devices, in this order, so that Linux numbers the consoles as listed:
  hvc0, hvc1   virtio consoles carrying the command's stdout and stderr, each byte as it is;
  hvc2         the control console: the guest's init and pyvmm talk there, a line at a time
               ("up", "ready", "start ID", "exit ID STATUS", "fail WHY"; "run ID", "quit");
  pyvmm-ctl    a read-only virtio-9p share of a private host directory with the setup script and
               one script per command (its directory, environment and argv, quoted for sh);
  pyvmm-root   the host's /, read-only, mounted as the guest's root with tmpfs on /tmp, /run and
               /var/tmp and fresh /proc, /sys, /dev: over virtio-fs, served by a virtiofsd with
               its own caching (--cache always: the root does not change under a session), where
               the host has virtiofsd and the kernel virtiofs, else over virtio-9p (cache=loose);
  pyvmm-rwN    each --rwdir, read-write, at the same path (virtio-fs with --cache never, or 9p
               without a cache: what either side writes, the other sees at once);
  virtio-rng   so that nothing in the guest waits for entropy.
The kernel's own console is the UART (ttyS0), kept in memory (its tail names a boot failure)
and written to --console-log. A command's status comes on the control console, never out of
its own output. What pyvmm says goes to stderr, never to stdout.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import re
import shlex
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pyvmm.errors import SharedMemoryRefusedError, VmmError
from pyvmm.exec import initramfs
from pyvmm.exec.shares import choose_share, setup_script, share_devices
from pyvmm.machine.lifecycle import RunResult

if TYPE_CHECKING:
    from pyvmm.devices.virtio.p9 import Virtio9p
    from pyvmm.machine.vm import Vm

log = logging.getLogger("pyvmm")

# Exit statuses of `pyvmm exec` that are pyvmm's own, not the command's (documented in pyvmm/cli/__init__.py).
EXIT_BOOT_FAILED = 123  # the guest never ran the command: kernel, modules, shares, directory
EXIT_TIMEOUT = 124  # --timeout expired (as timeout(1))
EXIT_PYVMM_FAILED = 125  # pyvmm could not start the guest: bad options, no KVM, a bad kernel

# The environment a command gets from pyvmm's own, as ssh and vng pass on the basics; --env adds.
CARRIED_ENV = ("PATH", "HOME", "USER", "LOGNAME", "SHELL", "TERM", "TZ", "LANG", "LANGUAGE", "LD_LIBRARY_PATH")
GUEST_TMPFS = ("/tmp", "/run", "/var/tmp")
CONTROL_LINE_MAX = 4096
CAPTURE_MAX = 64 << 20  # per stream and command, when captured: beyond it output is dropped
CONSOLE_TAIL = 8192


@dataclass
class Completed:
    """One command's end: its exit status (128 + N when signal N killed it) and, unless they were
    streamed elsewhere, its stdout and stderr."""

    status: int
    stdout: bytes = b""
    stderr: bytes = b""
    timeline: dict[str, float] = field(default_factory=dict)
    truncated: bool = False  # a captured stream went past CAPTURE_MAX and was cut there


class GuestFailed(VmmError):
    """The guest ended, or could not be set up, without running the command."""


class GuestTimedOut(VmmError):
    pass


def default_kernel() -> tuple[str, Path | None]:
    """The running kernel and its modules, as vng takes them: /boot/vmlinuz-$(uname -r) and
    /lib/modules/$(uname -r)."""
    release = os.uname().release
    kernel = f"/boot/vmlinuz-{release}"
    if not os.path.isfile(kernel):
        raise VmmError(f"no -k KERNEL given and the running kernel's image is not at {kernel}")
    if not os.access(kernel, os.R_OK):
        raise VmmError(f"the running kernel's image {kernel} is not readable by this user (some distributions "
                       "make it root's only): run as root, or give -k")
    modules = Path("/lib/modules") / release
    return kernel, modules if modules.is_dir() else None


def modules_of(kernel: str) -> Path | None:
    """/lib/modules/RELEASE for a kernel image, RELEASE read from its "Linux version" banner."""
    from pyvmm.boot.kernel import unpack_kernel

    try:
        data = unpack_kernel(kernel, os.path.basename(kernel), 1 << 30)
        if data is None:
            with open(kernel, "rb") as f:
                data = f.read(256 << 20)
    except OSError as e:
        raise VmmError(f"cannot read kernel {kernel}: {e.strerror}") from None
    found = re.search(rb"Linux version (\S+) ", data)
    if found is None:
        return None
    tree = Path("/lib/modules") / os.fsdecode(found.group(1))
    return tree if tree.is_dir() else None


def visible_in_guest(path: str, rwdirs: Sequence[str]) -> bool:
    """Whether host `path` is the same directory in the guest (not hidden by its tmpfs)."""
    def under(p: str, top: str) -> bool:
        return p == top or p.startswith(top.rstrip("/") + "/")
    return any(under(path, d) for d in rwdirs) or not any(under(path, t) for t in (*GUEST_TMPFS, "/proc", "/sys", "/dev"))


def command_script(argv: Sequence[str], env: Mapping[str, str], cwd: str) -> bytes:
    """The sh script one command runs as: its directory, exactly its environment, its argv.
    fd 4 is the control console, closed for the command itself."""
    q = shlex.quote
    assignments = " ".join(q(f"{k}={v}") for k, v in env.items())
    return os.fsencode(
        f"cd -- {q(cwd)} 2>/dev/null || {{ echo {q(f'fail the working directory {cwd} is not in the guest')} >&4; exit 1; }}\n"
        f"exec /run/pyvmm/busybox env -i -- {assignments} {' '.join(q(a) for a in argv)} 4>&-\n")


class ConsoleTail:
    """The kernel console (the UART's bytes): the last few KiB in memory, all of it in a file."""

    def __init__(self, log_path: str | None) -> None:
        from pyvmm.machine.host_console import ConsoleOutput

        self.tail: collections.deque[int] = collections.deque(maxlen=CONSOLE_TAIL)
        self.file: ConsoleOutput | None = None
        if log_path is not None:
            try:
                fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise VmmError(f"cannot write the console log {log_path}: {e.strerror}") from None
            self.file = ConsoleOutput(fd)

    def __call__(self, byte: int) -> None:
        self.tail.append(byte)
        if self.file is not None:
            self.file(byte)

    def last_line(self) -> str:
        lines = [x for x in bytes(self.tail).decode(errors="replace").replace("\r", "").split("\n") if x.strip()]
        return lines[-1].strip() if lines else ""

    def close(self) -> None:
        if self.file is not None:
            self.file.flush()
            os.close(self.file.fd)
            self.file = None


class LinuxSession:
    """A booted Linux guest on the host's root that runs commands: start(), run() as often as
    wanted, close(). Output is captured into each Completed unless `stdout`/`stderr` sinks
    take it as it comes (pyvmm exec streams it to its own fds)."""

    def __init__(self, *, kernel: str | None = None, modules: str | None = None, rwdirs: Sequence[str] = (),
                 cpus: int = 1, mem_mib: int = 512, params: str = "", console_log: str | None = None,
                 conduit: str = "hvc", stdout: Callable[[bytes], None] | None = None,
                 stderr: Callable[[bytes], None] | None = None,
                 configure: Callable[[Vm], None] | None = None, share: str = "auto") -> None:
        self.started = time.monotonic()
        self.timeline: dict[str, float] = {}
        self.rwdirs = [os.path.realpath(d) for d in rwdirs]
        for given, d in zip(rwdirs, self.rwdirs, strict=True):
            if not os.path.isdir(d):
                raise VmmError(f"--rwdir {given} is not a directory")
        if modules is not None and not Path(modules).is_dir():
            raise VmmError(f"--modules {modules} is not a directory")
        if modules is not None and kernel is None:
            raise VmmError("--modules names the modules of a -k kernel: give -k too")
        if kernel is None:
            kernel, tree = default_kernel()
        elif modules is not None:
            tree = Path(modules)
        else:
            tree = modules_of(kernel)
        self.kernel, self.modules = kernel, tree
        self.share = choose_share(share, tree)
        self._share_fallback = share == "auto"  # virtio-fs that will not start: 9p instead
        self.initrd = initramfs.build(tree)
        self._sinks = (stdout, stderr)
        self._captured = (bytearray(), bytearray())
        self._truncated = [False, False]
        self._events: queue.Queue[str] = queue.Queue(maxsize=256)
        self._line = bytearray()
        self._ids = 0
        self._lock = threading.Lock()
        self.result: RunResult | None = None
        self._ended = threading.Event()
        self._failure: str | None = None
        self._ctl = tempfile.mkdtemp(prefix="pyvmm-exec-")
        self.console = ConsoleTail(console_log)
        self.root_share: Virtio9p | None = None  # the 9p root's server (its request count), if 9p
        try:
            self._build(cpus, mem_mib, params, conduit, console_log is not None, configure)
        except BaseException:
            self._cleanup()
            raise

    def _build(self, cpus: int, mem_mib: int, params: str, conduit: str, verbose: bool,
               configure: Callable[[Vm], None] | None) -> None:
        from pyvmm.boot.load import boot
        from pyvmm.devices.virtio.console import VirtioConsole
        from pyvmm.devices.virtio.p9 import Virtio9p
        from pyvmm.devices.virtio.rng import VirtioRng
        from pyvmm.machine.vm import Vm  # noqa: F811 - the class itself, at run time

        while True:
            shares, self.root_share, self.share = share_devices(self.share, self.rwdirs, fallback=self._share_fallback)
            try:
                Path(self._ctl, "setup.sh").write_bytes(setup_script(self.rwdirs, self.share))
                self.vm = vm = Vm(cpus=cpus, mem_mib=mem_mib, conduit=conduit, console=self.console, reboot=False,
                                  shared_memory=self.share == "fs")
                break
            except SharedMemoryRefusedError as e:  # an MTE guest on Linux < 6.2: 9p, where chosen for us
                for share in shares:
                    share.close()
                if not self._share_fallback:
                    raise
                log.info("%s: the host's files go over 9p", e)
                self.share = "9p"
            except BaseException:
                for share in shares:
                    share.close()
                raise
        try:
            self._control_console = VirtioConsole(self._control)
            devices = [VirtioConsole(lambda b: self._output(0, b)), VirtioConsole(lambda b: self._output(1, b)),
                       self._control_console, Virtio9p(self._ctl, "pyvmm-ctl", read_only=True),
                       *shares, VirtioRng()]
            vm.add_virtio_devices(devices)  # the VM closes them from here on
            if configure is not None:
                configure(vm)
            cmdline = f"console=ttyS0 panic=-1 rdinit=/init {'' if verbose else 'quiet'} {params}"
            boot(vm, kernel=self.kernel, initrd=str(self.initrd), cmdline=" ".join(cmdline.split()))
        except BaseException:
            vm.close()
            raise

    # --- what the guest sends ---------------------------------------------------------------
    def _output(self, which: int, data: bytes) -> None:
        sink = self._sinks[which]
        if sink is not None:
            sink(data)
        else:
            with self._lock:
                buf = self._captured[which]
                room = CAPTURE_MAX - len(buf)
                if len(data) > room:
                    self._truncated[which] = True
                buf.extend(data[:max(0, room)])

    def _control(self, data: bytes) -> None:
        for byte in data:
            if byte == 0x0A:
                line = self._line.decode(errors="replace").strip()
                self._line.clear()
                try:
                    self._events.put_nowait(line)
                except queue.Full:
                    pass  # a guest writing lines nobody asked for: dropped, not hoarded
            elif len(self._line) < CONTROL_LINE_MAX:
                self._line.append(byte)

    def _send(self, line: str) -> None:
        self._control_console.receive(line.encode() + b"\n")

    def _next(self, deadline: float | None) -> str:
        """The next control line; GuestFailed if the guest ends first, GuestTimedOut at `deadline`."""
        while True:
            if self._ended.is_set() and self._events.empty():
                raise GuestFailed(self._why())
            wait = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
            if wait <= 0:
                raise GuestTimedOut("the guest did not answer in time (it is still running: stop() or close() it)")
            try:
                line = self._events.get(timeout=wait)
            except queue.Empty:
                continue
            what, _, rest = line.partition(" ")
            if what == "fail":
                self._failure = rest or "the guest's init failed"
            return line

    def _why(self) -> str:
        if self._failure is not None:
            return self._failure
        result = self.result
        reason = "the guest ended" if result is None else f"the guest ended: {result}"
        if result is not None and result.reason == "reset":
            reason = "the guest kernel reset (a panic reboots it)"
        tail = self.console.last_line()
        return f"{reason}; the kernel console's last line: {tail!r}" if tail else reason

    # --- life -----------------------------------------------------------------------------
    def start(self, timeout: float | None = None) -> None:
        """Boot until the guest's init is ready for commands."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self.timeline["vm built"] = time.monotonic() - self.started
        threading.Thread(target=self._run_vm, name="guest", daemon=True).start()
        while True:
            line = self._next(deadline)
            what = line.split(" ", 1)[0]
            if what in ("up", "ready"):
                self.timeline[what] = time.monotonic() - self.started
                log.info("guest init %s (guest uptime %s s)", what, line.partition(" ")[2])
            if what == "ready":
                return
            if what == "fail":
                raise GuestFailed(self._failure or line)

    def _run_vm(self) -> None:
        try:
            self.result = self.vm.run()
        finally:
            self._ended.set()

    def run(self, argv: Sequence[str] | str, *, env: Mapping[str, str] | None = None, cwd: str = "/",
            timeout: float | None = None) -> Completed:
        """Run a command (argv, or a string for sh -c) and wait for its end."""
        if isinstance(argv, str):
            argv = ["/bin/sh", "-c", argv]
        if not argv:
            raise VmmError("no command to run")
        deadline = None if timeout is None else time.monotonic() + timeout
        self._ids += 1
        ident = self._ids
        env = chosen_env(()) if env is None else dict(env)
        Path(self._ctl, f"cmd-{ident}.sh").write_bytes(command_script(argv, env, cwd))
        with self._lock:
            for buf in self._captured:
                buf.clear()
            self._truncated = [False, False]
        self._failure = None
        self._send(f"run {ident}")
        times: dict[str, float] = {}
        while True:
            try:
                words = self._next(deadline).split()
            except GuestFailed as e:
                if "start" in times:  # a kernel under test that panics in the command, say
                    raise GuestFailed(f"the guest ended while the command ran: {e}") from None
                raise
            if len(words) >= 2 and words[1] == str(ident) and words[0] in ("start", "exit"):
                times[words[0]] = time.monotonic() - self.started
                log.info("command %d: %s (guest uptime %s s)", ident, " ".join(words[0:1] + words[2:-1]), words[-1])
                if words[0] == "exit":
                    break
        os.unlink(os.path.join(self._ctl, f"cmd-{ident}.sh"))
        if self._failure is not None:
            raise GuestFailed(self._failure)
        try:
            status = int(words[2])
        except (IndexError, ValueError):
            raise GuestFailed(f"the guest's init reported {' '.join(words)!r}") from None
        if not 0 <= status <= 255:
            raise GuestFailed(f"the guest's init reported status {status}")
        with self._lock:
            out, err = (bytes(b) for b in self._captured)
            truncated = any(self._truncated)
        return Completed(status, out, err, times, truncated)

    def stop(self, message: str) -> None:
        self.vm.stop(message)

    def close(self, timeout: float = 10.0) -> RunResult | None:
        """Power the guest off (or stop it), and release everything."""
        if not self._ended.is_set() and hasattr(self, "vm"):
            try:
                self._send("quit")
            except Exception:  # noqa: BLE001 - the device may be gone; stopping is the fallback
                pass
            if not self._ended.wait(timeout):
                self.vm.stop("the guest did not power off after quit")
                self._ended.wait(timeout)
        self._cleanup()
        return self.result

    def _cleanup(self) -> None:
        if hasattr(self, "vm"):
            self.vm.close()
        self.console.close()
        shutil.rmtree(self._ctl, ignore_errors=True)

    def __enter__(self) -> LinuxSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def chosen_env(extra: Sequence[str]) -> dict[str, str]:
    """The carried-over variables (CARRIED_ENV and LC_*) plus each --env NAME=VALUE or NAME."""
    env = {k: v for k, v in os.environ.items() if k in CARRIED_ENV or k.startswith("LC_")}
    for item in extra:
        name, eq, value = item.partition("=")
        if not name or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise VmmError(f"--env {item!r}: give NAME=VALUE or NAME")
        if eq:
            env[name] = value
        elif name in os.environ:
            env[name] = os.environ[name]
    return env


def write_all(fd: int) -> Callable[[bytes], None]:
    """A sink that writes every byte to `fd`, blocking (a slow reader slows the guest, as a pipe
    slows a writer); a reader that went away (EPIPE) just stops getting output."""
    gone = False

    def sink(data: bytes) -> None:
        nonlocal gone
        view = memoryview(data)
        while view and not gone:
            try:
                view = view[os.write(fd, view):]
            except BlockingIOError:
                import select

                select.select([], [fd], [])
            except OSError:
                gone = True
    return sink

"""virtiofsd, the virtio-fs daemon (Rust; Debian 13 and Ubuntu 24.04 package it as `virtiofsd`),
started by pyvmm for `--fs DIR,TAG` and `pyvmm exec --share fs`.

pyvmm makes the listening socket itself, in a private directory, and hands it over with `--fd`:
the daemon needs no path of pyvmm's choosing and pyvmm connects at once, with no wait for a
socket file to appear. The daemon serves that one connection and exits when pyvmm closes it.
Its sandbox is the strongest it can set up for pyvmm's user (sandboxes(); fs.py tries them in
turn): a mount namespace confined to the shared directory (`--sandbox namespace`, the default;
unprivileged, it makes a user namespace), a chroot for root where namespaces are refused or / is
an initramfs, or, where the host refuses namespaces to another user, none (`--sandbox none`).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile

from pyvmm.errors import VmmError

# Debian's place for it, and QEMU's older one; $PYVMM_VIRTIOFSD or PATH first
PLACES = ("/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd")
CACHE_MODES = ("auto", "always", "never", "metadata")


def find() -> str | None:
    """The virtiofsd to run, or None where there is none."""
    chosen = os.environ.get("PYVMM_VIRTIOFSD")
    if chosen:
        return chosen if os.access(chosen, os.X_OK) else None
    found = shutil.which("virtiofsd")
    if found:
        return found
    return next((p for p in PLACES if os.access(p, os.X_OK)), None)


def sandboxes(root_user: bool, rootfs: bool) -> tuple[str, ...]:
    """The sandboxes to try, strongest first; the next is tried when a daemon ends before it
    answers. Root gets namespaces, or a chroot where it is refused them (a container without
    CAP_SYS_ADMIN) or on a host running from its initramfs, whose root pivot_root(2) cannot
    move (EINVAL). Another user may be refused namespaces, and then has none."""
    if root_user:
        return ("chroot",) if rootfs else ("namespace", "chroot")
    return ("namespace", "none")


def root_is_rootfs(mountinfo: str = "/proc/self/mountinfo") -> bool:
    """Whether / is the kernel's initial rootfs (an initramfs never switched away from)."""
    try:
        with open(mountinfo) as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and fields[4] == "/" and " - " in line:
                    return line.split(" - ", 1)[1].split()[0] == "rootfs"
    except OSError:
        pass
    return False


class Virtiofsd:
    """One virtiofsd serving `shared_dir` on a fresh socket (`socket_path`), in `sandbox`."""

    def __init__(self, shared_dir: str, *, read_only: bool, cache: str = "auto", sandbox: str = "namespace",
                 what: str = "virtio-fs") -> None:
        binary = find()
        if binary is None:
            raise VmmError(f"{what}: virtiofsd is not installed or not executable (Debian 13 and Ubuntu 24.04: "
                           "apt install virtiofsd; or set PYVMM_VIRTIOFSD)")
        if not os.path.isdir(shared_dir):
            raise VmmError(f"{what}: {shared_dir} is not a directory")
        if cache not in CACHE_MODES:
            raise VmmError(f"{what}: cache {cache!r} is not one of {', '.join(CACHE_MODES)}")
        self.what, self.sandbox = what, sandbox
        self.dir = tempfile.mkdtemp(prefix="pyvmm-virtiofsd-")
        self.socket_path = os.path.join(self.dir, "socket")
        self.log_path = os.path.join(self.dir, "log")
        self.proc: subprocess.Popen[bytes] | None = None
        args = [binary, f"--shared-dir={shared_dir}", f"--cache={cache}", f"--sandbox={sandbox}", "--log-level=error"]
        if read_only:
            args.append("--readonly")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(self.socket_path)
            listener.listen(1)
            with open(self.log_path, "wb") as log_file:
                self.proc = subprocess.Popen([*args, f"--fd={listener.fileno()}"], stdin=subprocess.DEVNULL,
                                             stdout=log_file, stderr=log_file, pass_fds=[listener.fileno()],
                                             start_new_session=True)
        except OSError as e:
            self.stop()
            raise VmmError(f"{what}: cannot start {binary}: {e.strerror or e}") from None
        finally:
            listener.close()  # the daemon's copy stays: pyvmm's connection queues on it

    def exit_status(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def last_words(self, wait: float = 0.0) -> str:
        """The daemon's last line of output and how it ended (waiting up to `wait` s for that)."""
        if self.proc is not None and wait:
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                pass
        try:
            with open(self.log_path, "rb") as f:
                lines = [line for line in f.read()[-4096:].decode(errors="replace").splitlines() if line.strip()]
        except OSError:
            lines = []
        status = self.exit_status()
        ended = "still running" if status is None else (
            f"killed by signal {-status}" if status < 0 else f"exit status {status}")
        return f"{lines[-1].strip()} ({ended})" if lines else ended

    def stop(self) -> None:
        """End the daemon (it ends by itself once pyvmm's connection closes) and clean up."""
        if self.proc is not None:
            try:
                self.proc.wait(2)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

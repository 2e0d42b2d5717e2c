"""A vhost-user daemon pyvmm starts (virtiofsd.py, storage_daemon.py): pyvmm makes the listening
socket itself, in a private directory, and hands the daemon its descriptor, so pyvmm connects at
once, with no wait for a socket file to appear; the daemon's output goes to a log whose last line
says, with its exit status, how it ended."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable

from pyvmm.errors import VmmError


class Daemon:
    """One daemon on a fresh socket (`socket_path`); a subclass builds its command line."""

    def __init__(self, prefix: str) -> None:
        self.dir = tempfile.mkdtemp(prefix=prefix)
        self.socket_path = os.path.join(self.dir, "socket")
        self.log_path = os.path.join(self.dir, "log")
        self.proc: subprocess.Popen[bytes] | None = None
        self.args: list[str] = []

    def start(self, args: Callable[[int], list[str]], what: str,
              preexec_fn: Callable[[], None] | None = None) -> None:
        """Start the daemon `args(fd)` names, fd being the listening socket it is handed."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(self.socket_path)
            listener.listen(1)
            self.args = args(listener.fileno())
            with open(self.log_path, "wb") as log_file:
                self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                                             pass_fds=[listener.fileno()], start_new_session=True,
                                             preexec_fn=preexec_fn)
        except (OSError, subprocess.SubprocessError) as e:  # SubprocessError: preexec_fn failed
            self.stop()
            reason = e.strerror if isinstance(e, OSError) and e.strerror else e
            raise VmmError(f"{what}: cannot start {self.args[0] if self.args else 'its daemon'}: {reason}") from None
        except BaseException:  # a stop signal during the start: no socket directory is left behind
            self.stop()
            raise
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

    def stop(self, terminate: bool = False) -> None:
        """End the daemon and clean up: wait for it to end by itself (or SIGTERM it first, if
        `terminate`), killing it after a grace."""
        if self.proc is not None:
            if terminate and self.proc.poll() is None:
                self.proc.terminate()
            try:
                self.proc.wait(5 if terminate else 2)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

"""The host side of the guest's console: output to a file descriptor, input from a terminal.

Output is written a line at a time (each byte a guest sends is an MMIO exit already; a write(2)
per byte would double it), and flushed at the end of a run. Input is read only when stdin is a
terminal, which is put in raw mode for the run; Ctrl-A x stops the VM, as in kvmtool.
"""

from __future__ import annotations

import io
import os
import select
import sys
import termios
import threading
import tty
from collections.abc import Callable
from typing import Any

CTRL_A = 0x01


def _stdout_fd() -> int:
    """Standard output's descriptor, also when sys.stdout was swapped for an object without one
    (an embedding application, pytest's capture): then the process's own fd 1."""
    try:
        return sys.stdout.fileno()
    except (AttributeError, ValueError, io.UnsupportedOperation):
        return 1


class ConsoleOutput:
    def __init__(self, fd: int | None = None) -> None:
        self.fd = _stdout_fd() if fd is None else fd
        self._buf = bytearray()
        self._lock = threading.Lock()

    def __call__(self, byte: int) -> None:
        with self._lock:
            self._buf.append(byte)
            if byte == 0x0A or len(self._buf) >= 256:
                self._flush_locked()

    def write(self, data: bytes) -> None:
        """Several bytes at once (virtio-console's transmit buffers)."""
        with self._lock:
            self._buf += data
            if b"\n" in data or len(self._buf) >= 256:
                self._flush_locked()

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        data, self._buf = bytes(self._buf), bytearray()
        while data:
            try:
                data = data[os.write(self.fd, data):]
            except BlockingIOError:
                select.select([], [self.fd], [])
            except OSError:
                return  # the reader went away; the guest keeps running


class ConsoleInput:
    """Feeds standard input to `receive` from a thread; Ctrl-A x calls `quit`. A terminal is
    put in raw mode (restored on stop); a pipe or file is passed through until its end."""

    def __init__(self, receive: Callable[[bytes], None], quit: Callable[[], None],
                 flush: Callable[[], None]) -> None:
        self._receive, self._quit, self._flush = receive, quit, flush
        self._fd = sys.stdin.fileno() if sys.stdin is not None else -1
        self._saved: list[Any] | None = None  # termios attributes
        self._stop_r, self._stop_w = os.pipe()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._fd < 0:
            return
        if os.isatty(self._fd):
            self._saved = termios.tcgetattr(self._fd)
            tty.setraw(self._fd)
        self._thread = threading.Thread(target=self._run, name="console-input", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._pump()
        except (OSError, ValueError):
            pass  # standard input went away: the guest keeps running without it

    def _pump(self) -> None:
        escape = False
        while True:
            ready, _, _ = select.select([self._fd, self._stop_r], [], [], 0.1)
            self._flush()  # a prompt without a newline still shows up
            if self._stop_r in ready:
                return
            if self._fd not in ready:
                continue
            data = os.read(self._fd, 256)
            if not data:
                return
            out = bytearray()
            for b in data:
                if escape:
                    escape = False
                    if b in (ord("x"), ord("X")):
                        self._quit()
                        return
                    if b != CTRL_A:
                        out.append(CTRL_A)
                elif b == CTRL_A:
                    escape = True
                    continue
                out.append(b)
            if out:
                self._receive(bytes(out))

    def stop(self) -> None:
        os.write(self._stop_w, b"x")
        if self._thread is not None:
            self._thread.join(1.0)
        if self._saved is not None:
            termios.tcsetattr(self._fd, termios.TCSADRAIN, self._saved)
            self._saved = None
        os.close(self._stop_r)
        os.close(self._stop_w)

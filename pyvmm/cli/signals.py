"""Stop signals from pyvmm's first instant: main() installs them before it does anything else."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class Interrupted(BaseException):
    """A stop signal that came before there was a machine to stop: it unwinds the set-up, as the
    KeyboardInterrupt it stands in for would, so that what was made is closed on the way out."""

    def __init__(self, signo: int) -> None:
        super().__init__(signo)
        self.signo = signo


class StopSignals:
    """SIGTERM, SIGINT and SIGHUP from pyvmm's first instant: main() installs them before it does
    anything else. Until a command hands over its machine (stop_with), a signal unwinds the
    set-up (Interrupted). From then on it stops the machine the way `pyvmm stop` does: every
    vCPU and device ends, disk images are flushed and closed. Either way pyvmm exits with 128 +
    the signal's number. A second SIGINT while it is stopping ends pyvmm at once (the user
    insists). A signal the user had ignored (nohup, a background job) stays ignored; the old
    handlers come back at the end."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self) -> None:
        self._stop: Callable[[str], None] | None = None
        self.received: int | None = None
        self._deferring = False
        self._pending = False  # a signal that came while deferring, not acted on yet
        self._saved = {signo: signal.getsignal(signo) for signo in self.SIGNALS}
        for signo, old in self._saved.items():
            if old is not signal.SIG_IGN:
                signal.signal(signo, self._handle)

    def stop_with(self, stop: Callable[[str], None]) -> None:
        """From now on a signal calls `stop`, on a thread of its own."""
        self._stop = stop

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """A signal waits until the block has ended, for a step that must not be cut in half (one
        that writes files and removes them if it fails); the block may hand over its machine
        (stop_with), which the signal then stops."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
            if self._pending:  # also when the block failed: the signal came first, it decides
                self._pending = False
                self._act()

    def message(self) -> str | None:
        return None if self.received is None else f"stopped by {signal.Signals(self.received).name}"

    def _handle(self, signo: int, frame: object) -> None:
        if self.received is None:
            self.received = signo
            if self._deferring:
                self._pending = True
            else:
                self._act()
        elif signo == signal.SIGINT:
            sys.stderr.flush()
            os._exit(128 + signo)

    def _act(self) -> None:
        assert self.received is not None
        if self._stop is None:
            raise Interrupted(self.received)
        # not here: the handler runs between two bytecodes of the main thread, which may hold the
        # locks stop() takes
        threading.Thread(target=self._stop, args=(self.message(),), name="stop", daemon=True).start()

    def restore(self) -> None:
        for signo, old in self._saved.items():
            signal.signal(signo, old)

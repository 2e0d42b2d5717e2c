"""`monitor` commands (GDB's qRcmd): what pyvmm adds to a debugger, SMCCC-aware stops.

  monitor catch smccc [FID[-FID]]...   stop the calling vCPU at forwarded SMCCC calls (all of them
                                       without a range) before pyvmm answers them
  monitor catch smccc off              stop catching
  monitor catch                        show what is caught
  monitor smccc trace on|off           every forwarded call, strace-style, in GDB's console
  monitor sdei signal EVENT [CPU]      raise an SDEI event (CPU: a private event's target vCPU)
  monitor help
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from pyvmm.errors import VmmError
from pyvmm.smccc.trace import format_record

if TYPE_CHECKING:
    from pyvmm.gdb.debugger import Debugger
    from pyvmm.services.sdei import Sdei
    from pyvmm.smccc.context import TraceEvent
    from pyvmm.smccc.dispatcher import Dispatcher, TraceRecord

HELP = __doc__.split("\n\n", 1)[1].rstrip() + "\n"  # the command list above
MAX_FID = 0xFFFF_FFFF
CONSOLE_LINES = 1000  # trace lines kept for GDB's console while it is not reading them


def parse_fid_range(text: str) -> tuple[int, int]:
    first, sep, last = text.partition("-")
    try:
        lo = int(first, 16) if not first.lower().startswith("0x") else int(first, 0)
        hi = lo if not sep else int(last, 16) if not last.lower().startswith("0x") else int(last, 0)
    except ValueError:
        raise VmmError(f"{text!r} is not a function ID or FID-FID range (hexadecimal)") from None
    if not 0 <= lo <= hi <= MAX_FID:
        raise VmmError(f"{text!r}: function IDs are 32 bits, the first no greater than the last")
    return lo, hi


class Monitor:
    def __init__(self, debugger: Debugger, dispatcher: Dispatcher, sdei: Callable[[], Sdei | None]) -> None:
        self._debugger, self._dispatcher, self._sdei = debugger, dispatcher, sdei
        self.console: deque[str] = deque(maxlen=CONSOLE_LINES)  # for the server to send as O packets
        self._saved_trace: Callable[[TraceRecord | TraceEvent], None] | None = None
        self._tracing = False

    def reset(self) -> None:
        """The client is gone: its trace goes off, its unread lines with it."""
        if self._tracing:
            self._trace(False)
        self.console.clear()

    def run(self, line: str) -> str:
        """A command's output (a line a person reads); errors are output too, as GDB shows them."""
        words = line.split()
        try:
            if not words or words == ["help"]:
                return HELP
            if words[0] == "catch":
                return self._catch(words[1:])
            if words[:2] == ["smccc", "trace"] and len(words) == 3 and words[2] in ("on", "off"):
                return self._trace(words[2] == "on")
            if words[:2] == ["sdei", "signal"] and len(words) in (3, 4):
                return self._signal(words[2:])
            return f"unknown monitor command {line.strip()!r}\n{HELP}"
        except VmmError as e:
            return f"error: {e}\n"

    def _catch(self, words: list[str]) -> str:
        if not words:
            return self._caught()
        if words[0] != "smccc":
            raise VmmError("pyvmm catches SMCCC calls: monitor catch smccc [FID[-FID]]... | off")
        if words[1:] == ["off"]:
            self._debugger.set_catches([])
            return "not catching SMCCC calls\n"
        ranges = [parse_fid_range(w) for w in words[1:]] or [(0, MAX_FID)]
        try:
            self._debugger.set_catches(self._debugger.catches + ranges)
        except ValueError as e:
            raise VmmError(str(e)) from None
        return self._caught()

    def _caught(self) -> str:
        ranges = self._debugger.catches
        if not ranges:
            return "not catching SMCCC calls\n"
        shown = ", ".join(f"{lo:#010x}" if lo == hi else f"{lo:#010x}-{hi:#010x}" for lo, hi in ranges)
        return f"catching SMCCC calls {shown} (forwarded ones: calls KVM answers itself never stop)\n"

    def _trace(self, on: bool) -> str:
        if on == self._tracing:
            return f"SMCCC trace is {'on' if on else 'off'} already\n"
        if on:
            self._saved_trace = previous = self._dispatcher.trace

            def tee(record: TraceRecord | TraceEvent) -> None:
                if previous is not None:
                    previous(record)
                self.console.append(format_record(record) + "\n")

            self._dispatcher.trace = tee
        else:
            self._dispatcher.trace = self._saved_trace
        self._tracing = on
        return f"SMCCC trace {'on' if on else 'off'}\n"

    def _signal(self, words: list[str]) -> str:
        sdei = self._sdei()
        if sdei is None:
            raise VmmError("this VM runs without SDEI (start it with --sdei, on Linux >= 6.4)")
        try:
            event = int(words[0], 0)
            cpu = int(words[1], 0) if len(words) > 1 else None
        except ValueError:
            raise VmmError("monitor sdei signal EVENT [CPU]: both are numbers") from None
        if sdei.trigger(event, cpu):
            return f"SDEI event {event} is pending: it is delivered when the guest runs\n"
        return f"SDEI event {event} dropped: the guest has not registered it\n"

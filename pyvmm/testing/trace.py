"""The SMCCC trace of a guest run, as a test reads it: each call and SDEI event, in order."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyvmm.machine.vm import Vm
    from pyvmm.smccc.context import TraceEvent
    from pyvmm.smccc.dispatcher import TraceRecord


@dataclass(frozen=True)
class TracedCall:
    """One forwarded SMCCC call as the dispatcher answered it."""

    seq: int  # its place among the trace's calls and events
    vcpu: int
    conduit: str  # the conduit the guest used: "hvc" or "smc"
    function_id: int
    name: str  # the function's name; for an ID no service implements, the ID in hex
    implemented: bool  # False: no service has the ID (the guest got NOT_SUPPORTED)
    arg_names: tuple[str, ...]
    args: tuple[int, ...]  # as the guest passed them (32 bits for an SMC32 call)
    results: tuple[int, ...] | None  # x0.. as the guest got them; None: the call did not return
    result_name: str  # x0's name ("SUCCESS", "NOT_SUPPORTED", ...) where the service gives one
    seconds: float  # in the handler
    at: float  # seconds from the start of the trace to the answer
    note: str  # why the dispatcher refused it, if it did ("not offered over smc")
    line: str  # the `--trace smccc` line

    def arg(self, which: int | str) -> int:
        """An argument by name, or by register number (1 = x1)."""
        if isinstance(which, str):
            return self.args[self.arg_names.index(which)]
        return self.args[which - 1]

    @property
    def x0(self) -> int | None:
        return None if self.results is None else self.results[0]

    @property
    def status(self) -> int | None:
        """x0 as a signed number (SMCCC and PSCI error codes are negative)."""
        from pyvmm.smccc.service import signed

        return None if self.results is None else signed(self.results[0])

    def __str__(self) -> str:
        return self.line


@dataclass(frozen=True)
class TracedEvent:
    """What a service did to a vCPU between calls (an SDEI dispatch or completion)."""

    seq: int
    vcpu: int
    source: str
    text: str
    at: float

    def __str__(self) -> str:
        return f"[vcpu{self.vcpu} {self.source}] --- {self.text} ---"


class SmcccTrace:
    """A Dispatcher.trace hook that keeps each call as a TracedCall (and each service event as
    a TracedEvent), in the order they were answered, for a test to assert on."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self._lock = threading.Lock()  # every vCPU thread reports here
        self._entries: list[TracedCall | TracedEvent] = []
        self.unavailable = False  # the host has no SMCCC filter: nothing can be traced
        self.off = False  # the run was made with trace=False: nothing was

    def attach(self, vm: Vm) -> None:
        """Record `vm`'s forwarded calls; without the SMCCC filter there are none to record."""
        if vm.has_smccc_filter:
            vm.smccc.trace = self
        else:
            self.unavailable = True

    def _check(self) -> None:
        # an empty trace would pass a test's "no SYSTEM_RESET was called" without looking
        if self.off:
            raise RuntimeError("this payload ran with trace=False: there is no SMCCC trace to read")
        if self.unavailable:
            from pyvmm.smccc import filter as smccc_filter

            raise smccc_filter.unavailable("the SMCCC trace (a PayloadRun's or the linux fixture's)")

    def __call__(self, record: TraceRecord | TraceEvent) -> None:
        from pyvmm.smccc.context import TraceEvent
        from pyvmm.smccc.trace import format_record

        at = time.monotonic() - self.started
        with self._lock:
            seq = len(self._entries)
            if isinstance(record, TraceEvent):
                self._entries.append(TracedEvent(seq, record.vcpu, record.source, record.text, at))
                return
            fn = record.function
            result_name = ""
            if record.results is not None:
                if fn is None or record.note:
                    result_name = "NOT_SUPPORTED"
                elif fn.describe is not None:
                    result_name = fn.describe(record.results[0])
            self._entries.append(TracedCall(
                seq, record.vcpu, record.conduit, record.function_id,
                fn.name if fn is not None else f"{record.function_id:#010x}", fn is not None,
                fn.args[:len(record.args)] if fn is not None else (), record.args, record.results, result_name,
                record.seconds, at, record.note, format_record(record)))

    @property
    def calls(self) -> list[TracedCall]:
        self._check()
        with self._lock:
            return [e for e in self._entries if isinstance(e, TracedCall)]

    @property
    def events(self) -> list[TracedEvent]:
        self._check()
        with self._lock:
            return [e for e in self._entries if isinstance(e, TracedEvent)]

    def calls_to(self, function: str | int, *, vcpu: int | None = None) -> list[TracedCall]:
        """The calls of one function, by name or function ID (on one vCPU)."""
        return [c for c in self.calls if (c.name == function if isinstance(function, str) else
                                          c.function_id == function) and (vcpu is None or c.vcpu == vcpu)]

    def names(self) -> list[str]:
        """The functions called, in order."""
        return [c.name for c in self.calls]

    def by_function(self) -> dict[str, list[TracedCall]]:
        grouped: dict[str, list[TracedCall]] = {}
        for c in self.calls:
            grouped.setdefault(c.name, []).append(c)
        return grouped

    def text(self) -> str:
        """The whole trace as `pyvmm run --trace smccc` prints it."""
        with self._lock:
            return "\n".join(str(e) for e in self._entries)

    def __len__(self) -> int:
        return len(self.calls)



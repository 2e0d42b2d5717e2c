"""Formatting forwarded SMCCC calls for people, one line each, like strace:

  [vcpu0 hvc] CPU_ON(target_cpu=0x1, entry_point_address=0x80000040, context_id=0x1) = 0x0 SUCCESS  <61 us> 0xc4000003

and what a service does to a vCPU between calls, like strace's signals:

  [vcpu0 sdei] --- dispatch event 0 -> handler 0x80000100 (arg 0x0, interrupted pc 0x80000040 pstate 0x3c5) ---
"""

from __future__ import annotations

import sys
from typing import TextIO

from pyvmm.smccc.context import TraceEvent
from pyvmm.smccc.dispatcher import TraceRecord


def format_record(r: TraceRecord | TraceEvent) -> str:
    if isinstance(r, TraceEvent):
        return f"[vcpu{r.vcpu} {r.source}] --- {r.text} ---"
    if r.function is None:
        call = "unknown()"
    else:
        call = f"{r.function.name}({', '.join(f'{n}={v:#x}' for n, v in zip(r.function.args, r.args, strict=False))})"
    if r.results is None:
        result = "? (does not return)"
    else:
        result = ", ".join(f"{v:#x}" for v in r.results)
        name = r.function.describe(r.results[0]) if r.function is not None and r.function.describe else ""
        if r.function is None or r.note:
            name = "NOT_SUPPORTED"
        if name:
            result += f" {name}"
    note = f" ({r.note})" if r.note else ""
    return f"[vcpu{r.vcpu} {r.conduit}] {call} = {result}{note}  <{r.seconds * 1e6:.0f} us> {r.function_id:#010x}"


class TracePrinter:
    """A Dispatcher.trace hook that prints each call as it is answered."""

    def __init__(self, out: TextIO = sys.stderr) -> None:
        self.out = out

    def __call__(self, record: TraceRecord | TraceEvent) -> None:
        print(format_record(record), file=self.out, flush=True)

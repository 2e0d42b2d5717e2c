"""The fuzz campaigns' sizes and their tallies.

Every fuzz test runs twice over: a share small enough for `make test`, and the whole campaign
under `make fuzz` (PYVMM_FUZZ=1). Each records what it fed pyvmm, and the session prints the
tallies at the end (tests/conftest.py), so the figures come from the run itself.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass, field

CAMPAIGN = os.environ.get("PYVMM_FUZZ") == "1"


def size(share: int, campaign: int) -> int:
    """`campaign` under `make fuzz`, `share` otherwise."""
    return campaign if CAMPAIGN else share


@dataclass
class Tally:
    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)  # device workers count too

    def add(self, what: str, n: int = 1) -> None:
        with self.lock:
            self.counts[what] = self.counts.get(what, 0) + n


TALLIES: dict[str, Tally] = {}


def tally(target: str) -> Tally:
    """The tally of one fuzzed target (created on first use; tests add to it)."""
    return TALLIES.setdefault(target, Tally())


def rss_kib() -> int:
    """This process's resident set size (VmRSS, /proc/self/status), in KiB."""
    with open("/proc/self/status") as f:
        match = re.search(r"^VmRSS:\s+(\d+) kB", f.read(), re.M)
    assert match is not None
    return int(match.group(1))


def summary_lines() -> list[str]:
    lines = []
    for target, t in sorted(TALLIES.items()):
        counts = ", ".join(f"{n:,} {what}" for what, n in t.counts.items())
        lines.append(f"fuzz{' campaign' if CAMPAIGN else ''}: {target}: {counts}" + "".join(f"; {n}" for n in t.notes))
    return lines

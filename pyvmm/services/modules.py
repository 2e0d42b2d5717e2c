"""Loading a user's SMCCC service from a Python file (`pyvmm run --service FILE`).

The file defines RANGE = (first function ID, count), handle(call) returning x0 or up to four
results, and optionally NAME. examples/vendor_service.py is one. Whatever the file does when it
is run (raises, calls sys.exit(), never finishes), the user gets one line naming it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import NamedTuple

from pyvmm.errors import VmmError
from pyvmm.smccc.filter import reserved_by_kvm
from pyvmm.smccc.function_id import is_id_range
from pyvmm.smccc.service import Handler

LOAD_TIME_LIMIT = 10.0  # seconds a service file may take to run at import


class _TooSlow(BaseException):
    """Not an Exception: a module's `except Exception` must not swallow its own time limit."""


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Interrupt the code running in the main thread after `seconds` (SIGALRM, setitimer(2)),
    and again every 0.1 s after that: a Python loop, or a sleep, at import ends with _TooSlow,
    even one that catches it once. Elsewhere, no limit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(signum: int, frame: FrameType | None) -> None:
        raise _TooSlow

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds, 0.1)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class ServiceModule(NamedTuple):
    base: int
    size: int  # function IDs in the range
    handle: Handler
    name: str


def load_service_module(path: str) -> ServiceModule:
    if not os.path.isfile(path):
        raise VmmError(f"service module {path} does not exist")
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(f"pyvmm_service_{name}", path)
    if spec is None or spec.loader is None:
        raise VmmError(f"service module {path} cannot be loaded as Python")
    module = importlib.util.module_from_spec(spec)
    try:
        with _time_limit(LOAD_TIME_LIMIT):
            spec.loader.exec_module(module)
    except _TooSlow:
        raise VmmError(f"service module {path} did not finish loading within {LOAD_TIME_LIMIT:g} s") from None
    except (Exception, SystemExit) as e:  # a module calling sys.exit() is a broken module too
        raise VmmError(f"service module {path} failed to load: {type(e).__name__}: {e}") from None
    rng, handle = getattr(module, "RANGE", None), getattr(module, "handle", None)
    if not (isinstance(rng, tuple) and len(rng) == 2 and all(isinstance(v, int) for v in rng)):
        raise VmmError(f"service module {path} must define RANGE = (first function ID, count)")
    if not callable(handle):
        raise VmmError(f"service module {path} must define handle(call)")
    check_ids(rng[0], rng[1], f"service module {path}: RANGE {rng[0]:#x}+{rng[1]}")
    return ServiceModule(rng[0], rng[1], handle, str(getattr(module, "NAME", name)))


def parse_range(text: str) -> tuple[int, int]:
    """'0xC3000000+0x100' (base + count) or '0xC3000000-0xC30000FF' (inclusive)."""
    try:
        if "+" in text:
            base, count = (int(v, 0) for v in text.split("+", 1))
        elif "-" in text:
            first, last = (int(v, 0) for v in text.split("-", 1))
            base, count = first, last - first + 1
        else:
            base, count = int(text, 0), 1
    except ValueError:
        raise VmmError(f"{text!r} is not a function-ID range (BASE+COUNT or FIRST-LAST)") from None
    check_ids(base, count, repr(text))
    return base, count


def check_ids(base: int, count: int, what: str) -> None:
    """A user's range must be 32-bit function IDs clear of those KVM keeps (filter.RESERVED):
    said before the VM is built, whatever the host."""
    if not is_id_range(base, count):
        raise VmmError(f"{what} is not a range of 32-bit function IDs")
    if (kept := reserved_by_kvm(base, count)) is not None:
        raise VmmError(f"{what} overlaps {kept}, which KVM keeps for the Arm architecture calls")

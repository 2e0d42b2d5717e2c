"""Loading a user's SMCCC service from a Python file (`pyvmm run --service FILE`).

The file defines RANGE = (first function ID, count), handle(call) returning x0 or up to four
results, and optionally NAME. examples/vendor_service.py is one.
"""

from __future__ import annotations

import importlib.util
import os
from typing import NamedTuple

from pyvmm.errors import VmmError
from pyvmm.smccc.service import Handler


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
        spec.loader.exec_module(module)
    except Exception as e:
        raise VmmError(f"service module {path} failed to load: {type(e).__name__}: {e}") from None
    rng, handle = getattr(module, "RANGE", None), getattr(module, "handle", None)
    if not (isinstance(rng, tuple) and len(rng) == 2 and all(isinstance(v, int) for v in rng)):
        raise VmmError(f"service module {path} must define RANGE = (first function ID, count)")
    if not callable(handle):
        raise VmmError(f"service module {path} must define handle(call)")
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
    if count < 1 or not 0 <= base < 1 << 32 or base + count > 1 << 32:
        raise VmmError(f"{text!r} is not a range of 32-bit function IDs")
    return base, count

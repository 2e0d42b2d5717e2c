"""pyvmm: a kvmtool-style userspace VMM for arm64 KVM, with SMCCC services in Python."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pyvmm.errors import VmmError

if TYPE_CHECKING:
    from pyvmm.machine.vm import RunResult, Vm
    from pyvmm.smccc.call import SmcccCall

__all__ = ["RunResult", "SmcccCall", "Vm", "VmmError"]
__version__ = "0.1.0"

# The VM's modules (cffi, the bindings, the devices) load when first asked for (PEP 562), so that
# `pyvmm`'s command line takes its stop signals before it imports them.
_LAZY = {"Vm": "pyvmm.machine.vm", "RunResult": "pyvmm.machine.vm", "SmcccCall": "pyvmm.smccc.call"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pyvmm' has no attribute {name!r}")

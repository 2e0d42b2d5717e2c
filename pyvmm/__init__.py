"""pyvmm: a kvmtool-style userspace VMM for arm64 KVM, with SMCCC services in Python."""

from pyvmm.errors import VmmError
from pyvmm.smccc.call import SmcccCall
from pyvmm.vm import RunResult, Vm

__all__ = ["RunResult", "SmcccCall", "Vm", "VmmError"]
__version__ = "0.1.0"

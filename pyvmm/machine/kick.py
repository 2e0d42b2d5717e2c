"""The signal that forces a vCPU thread out of KVM_RUN (Documentation/virt/kvm/api.rst,
"immediate_exit"): a real-time signal pyvmm keeps for itself, whose handler does nothing but make
the blocked ioctl return EINTR."""

from __future__ import annotations

import signal
import threading

from pyvmm.errors import VmmError

KICK_SIGNAL = signal.SIGRTMIN + 2
_kick_handler_installed = False


def install_kick_handler() -> None:
    """The kick signal needs a handler (not SIG_IGN/SIG_DFL) to interrupt KVM_RUN with EINTR.
    Python only lets the main thread install handlers, so the first VM must be made there."""
    global _kick_handler_installed
    if _kick_handler_installed:
        return
    if threading.current_thread() is not threading.main_thread():
        raise VmmError("create the first VM from the main thread (pyvmm installs its vCPU kick signal handler)")
    signal.signal(KICK_SIGNAL, lambda signum, frame: None)
    _kick_handler_installed = True

"""One vCPU's power state (PSCI 1.1 §5.7.1, the states AFFINITY_INFO reports), and the one place
that changes it.

A vCPU is ON, OFF or ON_PENDING. Any thread may ask an OFF vCPU to come on (PSCI CPU_ON): exactly
one of several concurrent callers sees OFF and makes it ON_PENDING; the others are told the state
that refused them (ALREADY_ON or ON_PENDING). The vCPU's own thread waits while it is OFF, boots
a pending CPU_ON and then marks itself ON; CPU_OFF, on its own thread, sends it back to waiting.
A suspended vCPU (CPU_SUSPEND, SYSTEM_SUSPEND) stays ON: `Suspend` records how it wakes.
"""

from __future__ import annotations

import threading
from enum import IntEnum
from typing import NamedTuple


class Power(IntEnum):
    """Values as AFFINITY_INFO returns them (PSCI 1.1 §5.7.1)."""

    ON = 0
    OFF = 1
    ON_PENDING = 2


class Entry(NamedTuple):
    """Where a vCPU starts: its entry point and the value of x0 (a CPU_ON context ID)."""

    address: int
    context_id: int


class PowerState:
    """The power state of one vCPU, guarded by its own lock."""

    def __init__(self, on: bool) -> None:
        self._cond = threading.Condition()
        self._state = Power.ON if on else Power.OFF
        self._pending: Entry | None = None  # where a pending CPU_ON boots the vCPU
        self._stopping = False

    @property
    def state(self) -> Power:
        return self._state

    def request_on(self, entry: Entry) -> Power | None:
        """PSCI CPU_ON, from any thread: an OFF vCPU becomes ON_PENDING and None is returned;
        otherwise nothing changes and the state that refused the call is returned."""
        with self._cond:
            state = self._state
            if state != Power.OFF:
                return state
            self._state = Power.ON_PENDING
            self._pending = entry
            self._cond.notify_all()
            return None

    def turn_off(self) -> None:
        """PSCI CPU_OFF, on the vCPU's own thread."""
        with self._cond:
            self._state = Power.OFF
            self._pending = None

    def wait_until_on(self) -> Entry | bool:
        """On the vCPU's own thread, outside KVM_RUN: wait while OFF. Returns the Entry of a
        pending CPU_ON to boot, True if the vCPU is simply ON, False when it is to stop."""
        with self._cond:
            while self._state == Power.OFF and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return False
            pending = self._pending if self._state == Power.ON_PENDING else None
            return True if pending is None else pending

    def booted(self) -> None:
        """The vCPU's thread has booted a pending CPU_ON: ON_PENDING becomes ON."""
        with self._cond:
            if self._state == Power.ON_PENDING:
                self._state = Power.ON
                self._pending = None

    def stop(self) -> None:
        """Release a thread waiting in wait_until_on(), for good (until reset())."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def reset(self, on: bool) -> None:
        """The machine's reset (the vCPU's thread is not running): back to the boot state."""
        with self._cond:
            self._state = Power.ON if on else Power.OFF
            self._pending = None
            self._stopping = False

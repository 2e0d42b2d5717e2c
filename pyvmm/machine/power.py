"""One vCPU's power state (PSCI 1.1 §5.7.1, the states AFFINITY_INFO reports), and the one place
that changes it.

A vCPU is ON, OFF or ON_PENDING. Any thread may ask an OFF vCPU to come on (PSCI CPU_ON): exactly
one of several concurrent callers sees OFF and makes it ON_PENDING; the others are refused. The
vCPU's own thread waits while it is OFF, boots a pending CPU_ON and then marks itself ON; CPU_OFF,
on its own thread, sends it back to waiting. A suspended vCPU stays ON.

What the guest sees (`guest_power`) is atomic: once a CPU_ON has succeeded the target is ON, and a
later CPU_ON is ALREADY_ON, as with KVM's in-kernel PSCI (arch/arm64/kvm/psci.c marks the target
runnable under its lock). The short while its thread takes to boot it is pyvmm's own, not a
pending power-on, and leaks out nowhere. ON_PENDING is reported only for a power-on that is
genuinely pending: one that cannot proceed because the target's thread has been told to stop
(the machine is stopping or resetting), so it will boot only if and when that thread runs again.
Internally the vCPU stays ON_PENDING until it has booted: firmware services (SDEI) deliver
nothing to a PE that has not booted yet.
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
    """Where a vCPU starts: its entry point, the value of x0 (a CPU_ON context ID) and of x1, x2,
    ... where a boot protocol needs more (an AArch32 Linux: r1 = ~0, r2 = the DTB)."""

    address: int
    context_id: int
    more: tuple[int, ...] = ()


class PowerState:
    """The power state of one vCPU, guarded by its own lock."""

    def __init__(self, on: bool) -> None:
        self._cond = threading.Condition()
        self._state = Power.ON if on else Power.OFF
        self._pending: Entry | None = None  # where a pending CPU_ON boots the vCPU
        self._stopping = False
        self._guest = self._state  # see guest_power

    @property
    def state(self) -> Power:
        return self._state

    @property
    def guest_power(self) -> Power:
        """The state as the guest sees it (PSCI AFFINITY_INFO, CPU_ON's refusals): ON_PENDING
        reads as ON unless the power-on genuinely waits for a stopped thread. Every transition
        keeps it in one attribute, under the lock, so reading it needs no lock: a guest may ask
        in a loop, and taking a Condition is two Python frames."""
        return self._guest

    def _changed(self) -> None:
        """Under the lock, after _state or _stopping changed: what guest_power reads from now on."""
        self._guest = Power.ON if self._state == Power.ON_PENDING and not self._stopping else self._state

    def request_on(self, entry: Entry) -> Power | None:
        """PSCI CPU_ON, from any thread: an OFF vCPU becomes ON_PENDING and None is returned;
        otherwise nothing changes and the state that refused the call, as the guest sees it
        (`guest_power`), is returned."""
        with self._cond:
            if self._state != Power.OFF:
                return self._guest
            self._state = Power.ON_PENDING
            self._pending = entry
            self._changed()
            self._cond.notify_all()
            return None

    def turn_off(self) -> None:
        """PSCI CPU_OFF, on the vCPU's own thread."""
        with self._cond:
            self._state = Power.OFF
            self._pending = None
            self._changed()

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
                self._changed()

    def stop(self) -> None:
        """Release a thread waiting in wait_until_on(), for good (until reset())."""
        with self._cond:
            self._stopping = True
            self._changed()
            self._cond.notify_all()

    def reset(self, on: bool) -> None:
        """The machine's reset (the vCPU's thread is not running): back to the boot state."""
        with self._cond:
            self._state = Power.ON if on else Power.OFF
            self._pending = None
            self._stopping = False
            self._changed()

"""SDEI events and their handler state (Arm DEN0054B): numbers, kinds, the state machine of §6.1.

Pure data and logic: nothing here touches a vCPU (delivery.py does) or answers a call (service.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from pyvmm.errors import VmmError

FN_BASE = 0xC400_0020  # SMC64 only (§5.1): VERSION is FN_BASE + 0 ... SHARED_RESET FN_BASE + 0x12
FN_COUNT = 0x13
VERSION_1_1 = (1 << 48) | (1 << 32)  # major [62:48], minor [47:32], vendor-defined [31:0] = 0

# Return codes (§5.2, table 5-1)
SUCCESS = 0
NOT_SUPPORTED = -1
INVALID_PARAMETERS = -2
DENIED = -3
PENDING = -5
OUT_OF_RESOURCE = -10
ERROR_NAMES = {0: "SUCCESS", -1: "NOT_SUPPORTED", -2: "INVALID_PARAMETERS", -3: "DENIED", -5: "PENDING",
               -10: "OUT_OF_RESOURCE"}

# EVENT_STATUS bits (§5.1.8), also the state-machine states below
REGISTERED, ENABLED, RUNNING = 1, 2, 4

# EVENT_REGISTER / ROUTING_SET flags (§5.1.2): bit 0 routing mode; bit 1 relative mode (1.1)
ROUTE_PE = 1
RELATIVE_MODE = 2

# EVENT_GET_INFO info (§5.1.9)
INFO_TYPE, INFO_SIGNALED, INFO_PRIORITY, INFO_ROUTING_MODE, INFO_ROUTING_AFF = range(5)

# FEATURES (§5.1.17)
FEATURE_BIND_SLOTS, FEATURE_RELATIVE_MODE = 0, 1

BIND_EVENT_BASE = 1000  # bound interrupts become shared events 1000, 1001, ...
BIND_SLOTS = 16
EVENT_NUMBER_MAX = 0x7FFF_FFFF  # event numbers are 32-bit and positive (bit 31 clear)
CONTEXT_REGS = 18  # x0-x17 (§5.1.4)
MPIDR_AFF_MASK = 0xFF_00FF_FFFF  # Aff3 [39:32], Aff2..Aff0 [23:0]


class Action(IntEnum):
    REGISTER = 0
    RELEASE = 1
    ENABLE = 2
    DISABLE = 3
    UNREGISTER = 4
    ROUTING = 5
    CONTEXT = 6
    COMPLETE = 7
    DISPATCH = 8


# The handler state machine (§6.1, table 6-1): the state after each permitted action; an action
# missing from a state's row is not permitted there (the call returns DENIED). The state is the
# EVENT_STATUS value. RUNNING alone is "handler unregister-pending": UNREGISTER while running.
_A = Action
TRANSITIONS: dict[int, dict[Action, int]] = {
    0: {_A.REGISTER: REGISTERED, _A.RELEASE: 0},
    REGISTERED: {_A.ENABLE: REGISTERED | ENABLED, _A.DISABLE: REGISTERED, _A.UNREGISTER: 0,
                 _A.ROUTING: REGISTERED},
    REGISTERED | ENABLED: {_A.ENABLE: REGISTERED | ENABLED, _A.DISABLE: REGISTERED, _A.UNREGISTER: 0,
                           _A.DISPATCH: REGISTERED | ENABLED | RUNNING},
    REGISTERED | RUNNING: {_A.ENABLE: REGISTERED | ENABLED | RUNNING, _A.DISABLE: REGISTERED | RUNNING,
                           _A.UNREGISTER: RUNNING, _A.CONTEXT: REGISTERED | RUNNING, _A.COMPLETE: REGISTERED},
    REGISTERED | ENABLED | RUNNING: {_A.ENABLE: REGISTERED | ENABLED | RUNNING,
                                     _A.DISABLE: REGISTERED | RUNNING, _A.UNREGISTER: RUNNING,
                                     _A.CONTEXT: REGISTERED | ENABLED | RUNNING,
                                     _A.COMPLETE: REGISTERED | ENABLED},
    RUNNING: {_A.CONTEXT: RUNNING, _A.COMPLETE: 0},
}


def transition(reg: Registration, action: Action) -> bool:
    """Apply `action` to `reg` if the state machine permits it there (else nothing changes)."""
    nxt = TRANSITIONS[reg.state].get(action)
    if nxt is None:
        return False
    reg.state = nxt
    return True


@dataclass(frozen=True)
class EventSpec:
    """A platform event: its number, private (one per PE) or shared, normal or critical."""

    number: int
    shared: bool = False
    critical: bool = False
    signalable: bool = False  # only event 0 (EVENT_SIGNAL)
    interrupt: int | None = None  # INTID of a bound event

    def describe(self) -> str:
        kind = "shared" if self.shared else "private"
        extra = f", bound to INTID {self.interrupt}" if self.interrupt is not None else ""
        return f"event {self.number} ({kind}, {'critical' if self.critical else 'normal'}{extra})"


def parse_event(text: str) -> EventSpec:
    """NUMBER[,shared|private][,critical|normal], the --sdei-event syntax."""
    parts = [p.strip().lower() for p in text.split(",")]
    try:
        number = int(parts[0], 0)
    except ValueError:
        raise VmmError(f"SDEI event {text!r}: the event number comes first, e.g. 100,shared,critical") from None
    shared = critical = False
    for p in parts[1:]:
        if p in ("shared", "private"):
            shared = p == "shared"
        elif p in ("critical", "normal"):
            critical = p == "critical"
        else:
            raise VmmError(f"SDEI event {text!r}: {p!r} is not shared, private, critical or normal")
    return EventSpec(number, shared, critical)


class Registration:
    """One event's handler state: per PE for a private event, one for a shared event."""

    __slots__ = ("spec", "pe", "state", "entry", "arg", "route_pe", "affinity", "pending")

    def __init__(self, spec: EventSpec, pe: int | None) -> None:
        self.spec, self.pe = spec, pe
        self.state = 0
        self.entry = self.arg = self.affinity = 0
        self.route_pe = False
        self.pending = False  # triggered and not yet dispatched

    def clear(self) -> None:
        self.entry = self.arg = self.affinity = 0
        self.route_pe = False
        self.pending = False

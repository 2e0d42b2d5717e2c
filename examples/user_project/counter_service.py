"""An OEM SMCCC service prototyped in Python: a counter per vCPU.

A service module in the shape `pyvmm run --service` loads (RANGE, NAME, handle); the tests in
tests/ hand the same file to the pytest plugin's run_payload fixture. Function IDs are SMC64
fast calls of owner 3 (OEM service calls, SMCCC 1.4 table 6-2):

  0xC3000000  VERSION         -> 1.0 (major << 16 | minor)
  0xC3000001  ADD(amount)     -> (SUCCESS, the calling vCPU's new count)
  0xC3000002  READ(vcpu)      -> (SUCCESS, that vCPU's count), INVALID_PARAMETERS past MAX_VCPUS
  0xC3000003  TOTAL()         -> (SUCCESS, the sum over every vCPU)
  any other ID in the range   -> NOT_SUPPORTED (SMCCC 1.4 §5.2)
"""

from __future__ import annotations

import threading

from pyvmm import SmcccCall

NAME = "counter service"
RANGE = (0xC300_0000, 0x10)

VERSION, ADD, READ, TOTAL = range(4)
SUCCESS, NOT_SUPPORTED, INVALID_PARAMETERS = 0, -1, -2
MAX_VCPUS = 8
MASK = (1 << 64) - 1  # counts wrap as the registers they are returned in do

_counts = [0] * MAX_VCPUS
_lock = threading.Lock()  # each vCPU calls in on its own thread


def handle(call: SmcccCall) -> int | tuple[int, ...]:
    number = call.function_id - RANGE[0]
    if number == VERSION:
        return 1 << 16
    if number == ADD:
        with _lock:
            index = call.vcpu.index
            _counts[index] = (_counts[index] + call.arg(1)) & MASK
            return SUCCESS, _counts[index]
    if number == READ:
        which = call.arg(1)
        if which >= MAX_VCPUS:
            return INVALID_PARAMETERS
        with _lock:
            return SUCCESS, _counts[which]
    if number == TOTAL:
        with _lock:
            return SUCCESS, sum(_counts) & MASK
    return NOT_SUPPORTED

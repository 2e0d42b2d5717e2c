"""A vendor-hypervisor SMCCC service in one small module: the shape `pyvmm run --service` loads.

    pyvmm run -f guest.bin --service examples/vendor_service.py --trace smccc

A service module defines RANGE (first function ID, count), optionally NAME, and handle(call),
which returns x0 or up to four results (x0..x3). IDs inside RANGE that handle() does not know
should get -1 (NOT_SUPPORTED), as SMCCC 1.4 §5.2 asks.
"""

from __future__ import annotations

from pyvmm import SmcccCall

NAME = "demo vendor service"
RANGE = (0xC600_0000, 0x100)  # SMC64 fast calls, owner 6 (vendor-specific hypervisor service)

VERSION, ADD, SWAP = 0, 1, 2


def handle(call: SmcccCall) -> int | tuple[int, ...]:
    number = call.function_id & 0xFFFF
    if number == VERSION:
        return 1 << 16  # 1.0
    if number == ADD:
        return call.arg(1) + call.arg(2)
    if number == SWAP:
        x1, x2, x3 = call.args(3)
        return (0, x3, x2, x1)
    return -1

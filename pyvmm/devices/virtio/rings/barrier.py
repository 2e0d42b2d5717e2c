"""A full memory barrier between pyvmm's own loads and stores of guest memory.

Virtqueues are shared with a guest running on other CPUs, and the split-ring protocol needs
barriers on the device side (virtio 1.2 §2.7.13: read the avail ring's entries only after its
index; §2.7.8: publish used elements before the used index; §2.7.10: the event-index check needs
a full barrier). Python has no fence, and arm64 reorders plain loads and stores, so on arm64
`fence()` calls two instructions placed in an executable page: DMB ISH; RET (Arm ARM C6.2.81
DMB, C6.2.254 RET). Elsewhere it is a no-op: pyvmm only drives KVM on arm64, and other hosts
only run the pure-logic unit tests, single-threaded.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Callable

from kvm_bindings import ffi

DMB_ISH = 0xD5033BBF
RET = 0xD65F03C0


def _arm64_fence() -> Callable[[], None]:
    # The code is written through a memfd and mapped read+exec afterwards (never writable and
    # executable at once): the kernel makes the instruction cache coherent when it maps a page
    # executable (arm64 set_pte_at -> __sync_icache_dcache).
    fd = os.memfd_create("pyvmm-fence", os.MFD_CLOEXEC)
    try:
        os.write(fd, struct.pack("<II", DMB_ISH, RET).ljust(mmap.PAGESIZE, b"\0"))
        page = mmap.mmap(fd, mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_EXEC)
    finally:
        os.close(fd)
    buffer = ffi.from_buffer(page)
    fn: Callable[[], None] = ffi.cast("void (*)(void)", buffer)
    _keep.extend((page, buffer))  # the code must outlive every call
    return fn


def _no_fence() -> None:
    pass


_keep: list[object] = []
fence: Callable[[], None] = _arm64_fence() if os.uname().machine == "aarch64" else _no_fence

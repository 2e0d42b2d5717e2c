"""Guest RAM: host mappings registered as KVM memslots, with bounds-checked access.

RAM is anonymous memory, or, when a vhost-user device's daemon must reach it (`shared`), a memfd
mapped MAP_SHARED whose descriptor goes to the daemon (the vhost-user spec's memory table), as
QEMU's memory-backend-memfd and Firecracker's vhost-user support back it.

Every guest-physical access from the VMM goes through `GuestMemory`, which refuses any range that
is not wholly inside one RAM region, so a hostile guest address can never reach host memory
outside the guest's own RAM. `view()` hands out zero-copy memoryviews for device I/O.
"""

from __future__ import annotations

import fcntl
import mmap
import os

from kvm_bindings import ffi
from pyvmm.errors import GuestMemoryError

RAM_BASE = 0x8000_0000  # kvmtool's arm64 layout (arm/include/arm-common/kvm-arch.h): RAM from 2 GiB
PAGE_SIZE = mmap.PAGESIZE  # the host's: 4 KiB, or 16 KiB (Asahi Linux, Debian's -arm64-16k), or 64 KiB


def block_size(page: int) -> int:
    """A level-2 block with `page`-sized granules (a PMD: a whole table of page/8 descriptors,
    Arm ARM D8.3): what a transparent huge page is, and what KVM's stage 2 can map whole."""
    return page * (page // 8)


HUGE_PAGE = block_size(PAGE_SIZE)  # 2 MiB with 4 KiB pages, 32 MiB with 16 KiB, 512 MiB with 64 KiB
# Guest RAM is backed as the guest touches it, without reserving swap for all of it up front, as
# kvmtool maps it. Python names the flag only from 3.13; its value is Linux's on every
# architecture pyvmm runs on (include/uapi/asm-generic/mman.h).
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
KVM_MEM_MAX_NR_PAGES = (1 << 31) - 1  # the most pages in one memslot (include/linux/kvm_host.h)


class Region:
    """One memslot's worth of guest RAM and the host mapping behind it."""

    __slots__ = ("gpa", "size", "slot", "readonly", "ram", "mapping", "fd", "offset", "host_addr", "_buffer",
                 "view")

    def __init__(self, gpa: int, size: int, slot: int, readonly: bool, mapping: mmap.mmap, align: int = 1,
                 ram: bool = True, fd: int = -1) -> None:
        self.gpa, self.size, self.slot, self.readonly, self.mapping = gpa, size, slot, readonly, mapping
        self.ram = ram  # the guest's RAM (the DT's /memory), not memory KVM uses for itself (PV time)
        self.fd = fd  # the memfd `mapping` maps from its start, or -1 (anonymous memory)
        self._buffer = ffi.from_buffer(mapping)  # keeps the host address valid
        base = int(ffi.cast("uintptr_t", self._buffer))
        self.offset = -base % align  # where the guest's bytes start inside `mapping` (and the memfd)
        self.host_addr = base + self.offset
        self.view = memoryview(mapping)[self.offset:self.offset + size]  # the guest's bytes, zero-copy

    def __repr__(self) -> str:
        return f"Region({self.gpa:#x}+{self.size:#x}, slot {self.slot})"

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def overlaps(self, gpa: int, size: int) -> bool:
        return gpa < self.end and self.gpa < gpa + size


class GuestMemory:
    def __init__(self, *, shared: bool = False) -> None:
        """`shared`: RAM regions are memfds mapped MAP_SHARED, for vhost-user daemons."""
        self.regions: list[Region] = []
        self.shared = shared

    def add(self, gpa: int, size: int, *, readonly: bool = False, ram: bool = True) -> Region:
        """Map `size` bytes of fresh zeroed host memory for guest-physical `gpa`."""
        if size <= 0 or gpa % PAGE_SIZE or size % PAGE_SIZE:
            raise GuestMemoryError(
                f"memory region {gpa:#x}+{size:#x} must be a non-empty multiple of the {PAGE_SIZE}-byte page")
        if gpa + size > 1 << 48:
            raise GuestMemoryError(f"memory region {gpa:#x}+{size:#x} is beyond the 48-bit IPA space")
        if size // PAGE_SIZE > KVM_MEM_MAX_NR_PAGES:
            raise GuestMemoryError(f"cannot map {size >> 20} MiB of guest RAM: KVM takes at most "
                                   f"{KVM_MEM_MAX_NR_PAGES * PAGE_SIZE >> 20} MiB in one memory slot")
        for r in self.regions:
            if r.overlaps(gpa, size):
                raise GuestMemoryError(
                    f"memory region {gpa:#x}-{gpa + size - 1:#x} overlaps {r.gpa:#x}-{r.end - 1:#x}")
        # Transparent huge pages, as kvmtool does: with the host range aligned to a block like the
        # guest's, KVM maps guest RAM at stage 2 in blocks (2 MiB with 4 KiB pages), so a booting
        # kernel takes a fraction of the stage-2 faults. The mapping is over-allocated to align it.
        huge = size >= HUGE_PAGE and gpa % HUGE_PAGE == 0 and hasattr(mmap, "MADV_HUGEPAGE")
        extra = HUGE_PAGE if huge else 0
        fd = -1
        try:
            if self.shared and ram:
                # shmem pages are allocated as the guest touches them, as anonymous ones are
                fd = os.memfd_create(f"pyvmm-ram@{gpa:#x}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
                os.ftruncate(fd, size + extra)
                # sealed at its size, as QEMU and Firecracker seal theirs: a daemon given the fd
                # cannot shrink it under pyvmm (whose next access would be a SIGBUS)
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
                m = mmap.mmap(fd, size + extra, mmap.MAP_SHARED)
            else:
                m = mmap.mmap(-1, size + extra, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE)
        except OSError as e:
            if fd >= 0:
                os.close(fd)
            raise GuestMemoryError(f"cannot map {size >> 20} MiB of guest RAM: {e.strerror}") from None
        region = Region(gpa, size, len(self.regions), readonly, m, HUGE_PAGE if huge else 1, ram, fd)
        if huge:
            try:
                m.madvise(mmap.MADV_HUGEPAGE, region.offset, size)
            except OSError:
                pass  # THP disabled on this host (for shmem: shmem_enabled is "never"): small pages work
        self.regions.append(region)
        return region

    def find(self, gpa: int, size: int = 1) -> Region:
        for r in self.regions:
            if r.gpa <= gpa and gpa + size <= r.end:
                return r
        raise GuestMemoryError(f"guest range {gpa:#x}+{size:#x} is not inside guest RAM")

    def contains(self, gpa: int, size: int = 1) -> bool:
        return any(r.gpa <= gpa and gpa + size <= r.end for r in self.regions)

    def view(self, gpa: int, size: int) -> memoryview:
        """Zero-copy view of [gpa, gpa+size); the range must lie in one region."""
        if size < 0 or gpa < 0:
            raise GuestMemoryError(f"bad guest range {gpa:#x}+{size:#x}")
        for r in self.regions:  # on the virtqueue path: kept to plain arithmetic
            off = gpa - r.gpa
            if off >= 0 and off + size <= r.size:
                return r.view[off:off + size]
        raise GuestMemoryError(f"guest range {gpa:#x}+{size:#x} is not inside guest RAM")

    def host_address(self, gpa: int, size: int) -> int:
        """Where [gpa, gpa+size) is in this process (it must lie in one region): what a
        vhost-user back-end is told, as it translates through the memory table."""
        r = self.find(gpa, size)
        return r.host_addr + gpa - r.gpa

    def read(self, gpa: int, size: int) -> bytes:
        return bytes(self.view(gpa, size))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self.view(gpa, len(data))[:] = data

    def close(self) -> None:
        for r in self.regions:
            r.view.release()
            ffi.release(r._buffer)
            r.mapping.close()
            if r.fd >= 0:
                os.close(r.fd)
        self.regions.clear()

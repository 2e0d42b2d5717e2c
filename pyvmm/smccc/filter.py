"""The KVM SMCCC filter: which function-ID ranges KVM forwards to pyvmm, denies, or handles itself.

Documentation/virt/kvm/devices/vm.rst (KVM_ARM_VM_SMCCC_FILTER, Linux >= 6.4): ranges are
[base, base + nr_functions), may not overlap each other or KVM's reserved ranges, may not wrap,
and can only be installed before any vCPU has run. Validation here is pure logic, so mistakes are
reported before any ioctl, naming the range; what KVM still refuses is translated as well.
"""

from __future__ import annotations

import errno
import os
from typing import NamedTuple, Protocol

from kvm_bindings.constants import KVM_ARM_VM_SMCCC_CTRL, KVM_ARM_VM_SMCCC_FILTER, SmcccFilterAction
from pyvmm.errors import KvmIoctlError, SmcccFilterError, SmcccFilterUnavailableError

# KVM keeps the Arm architecture calls (SMCCC_VERSION, ARCH_FEATURES, workarounds) to itself in
# both calling conventions: arch/arm64/kvm/hypercalls.c, init_smccc_filter().
RESERVED = ((0x8000_0000, 0x1_0000), (0xC000_0000, 0x1_0000))
MIN_KERNEL_TEXT = "6.4"  # KVM_ARM_VM_SMCCC_FILTER appeared in Linux 6.4


class FilterFd(Protocol):
    """The VM fd's two filter operations (pyvmm.kvm.fds.VmFd)."""

    def has_device_attr(self, group: int, attr: int) -> bool: ...

    def set_smccc_filter(self, base: int, nr_functions: int, action: int) -> None: ...


class FilterRange(NamedTuple):
    base: int
    size: int  # function IDs in the range
    action: SmcccFilterAction
    name: str = ""

    @property
    def last(self) -> int:
        return self.base + self.size - 1

    def overlaps(self, base: int, count: int) -> bool:
        return self.base < base + count and base < self.base + self.size

    def __str__(self) -> str:
        label = f" ({self.name})" if self.name else ""
        return f"{self.base:#010x}-{self.last:#010x} {self.action.name.lower()}{label}"


def validate(ranges: list[FilterRange]) -> None:
    """Raise SmcccFilterError for the first range KVM would refuse."""
    seen: list[FilterRange] = []
    for r in ranges:
        if r.size <= 0 or r.base < 0:
            raise SmcccFilterError(f"SMCCC filter range {r.base:#x}+{r.size}: needs at least one function")
        if r.base + r.size > 1 << 32:
            raise SmcccFilterError(f"SMCCC filter range {r}: wraps past 0xffffffff")
        if (kept := reserved_by_kvm(r.base, r.size)) is not None:
            raise SmcccFilterError(f"SMCCC filter range {r}: overlaps {kept}, which KVM reserves for the Arm "
                                   "architecture calls")
        for other in seen:
            if r.overlaps(other.base, other.size):
                raise SmcccFilterError(f"SMCCC filter range {r}: overlaps range {other}")
        seen.append(r)


def reserved_by_kvm(base: int, count: int) -> str | None:
    """The range of RESERVED that [base, base + count) overlaps, as `first-last`, or None."""
    for first, size in RESERVED:
        if first < base + count and base < first + size:
            return f"{first:#010x}-{first + size - 1:#010x}"
    return None


def supported(vm_fd: FilterFd) -> bool:
    """Whether this KVM has the filter (KVM_HAS_DEVICE_ATTR on the VM fd)."""
    return vm_fd.has_device_attr(KVM_ARM_VM_SMCCC_CTRL, KVM_ARM_VM_SMCCC_FILTER)


def check_supported(vm_fd: FilterFd) -> None:
    """A clear error if this KVM has no filter."""
    if not supported(vm_fd):
        raise SmcccFilterUnavailableError(
            f"this kernel's KVM has no SMCCC filter (KVM_ARM_VM_SMCCC_FILTER); it needs Linux >= "
            f"{MIN_KERNEL_TEXT}, this host runs {os.uname().release}")


def unavailable(what: str) -> SmcccFilterUnavailableError:
    """The error for `what` (a feature, or the option that asks for it) on a host without the
    filter: one line naming the kernel it needs."""
    return SmcccFilterUnavailableError(
        f"{what} needs KVM's SMCCC filter, which Linux >= {MIN_KERNEL_TEXT} has; this host runs "
        f"{os.uname().release} (guests run there with KVM's in-kernel PSCI)")


def install(vm_fd: FilterFd, ranges: list[FilterRange]) -> None:
    """Validate, probe, then install each range (one KVM_SET_DEVICE_ATTR per range)."""
    validate(ranges)
    if not ranges:
        return
    check_supported(vm_fd)
    for r in ranges:
        install_range(vm_fd, r)


def install_range(vm_fd: FilterFd, r: FilterRange) -> None:
    """One range straight to KVM (no validation), with KVM's refusals put in words."""
    try:
        vm_fd.set_smccc_filter(r.base, r.size, int(r.action))
    except KvmIoctlError as e:
        reason = {
            errno.EEXIST: "overlaps a range already installed or one KVM reserves",
            errno.EBUSY: "a vCPU has already run; KVM accepts filter ranges only before the first KVM_RUN",
            errno.EINVAL: "KVM rejects it as invalid (wrapping range or bad action)",
            errno.ENXIO: f"this KVM has no SMCCC filter (needs Linux >= {MIN_KERNEL_TEXT})",
        }.get(e.errno, str(e))
        raise SmcccFilterError(f"SMCCC filter range {r}: {reason} [{errno.errorcode.get(e.errno, e.errno)}]") from None

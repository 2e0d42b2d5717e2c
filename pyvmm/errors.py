"""pyvmm's exceptions. Every message is one line a user can act on."""

from __future__ import annotations

import errno
import os


class VmmError(Exception):
    """Base of every error pyvmm reports to a user (the CLI prints it as one line)."""

    label = "error"  # the CLI's line: "pyvmm: LABEL: message"


class KvmUnavailableError(VmmError):
    pass


class KvmIoctlError(VmmError):
    """An ioctl failed; carries the request's name and errno."""

    def __init__(self, name: str, err: int, context: str = "") -> None:
        self.name, self.errno = name, err
        code = errno.errorcode.get(err, str(err))
        where = f" ({context})" if context else ""
        super().__init__(f"{name} failed{where}: {code} ({os.strerror(err)})")


class GuestMemoryError(VmmError):
    pass


class SharedMemoryRefusedError(GuestMemoryError):
    """KVM refuses guest RAM shared with a daemon (a memfd) to an MTE guest (Linux < 6.2)."""


class SmcccFilterError(VmmError):
    pass


class SmcccFilterUnavailableError(SmcccFilterError, KvmUnavailableError):
    """What was asked for needs KVM's SMCCC filter (Linux >= 6.4), which this host's KVM lacks:
    pyvmm's PSCI, SDEI, custom SMCCC services, denied ranges and the SMCCC trace all service or
    see calls KVM forwards. Guests still run there, with KVM's in-kernel PSCI (Vm.has_smccc_filter)."""


class GuestError(VmmError):
    """The guest did something the VMM cannot service (and the run ends)."""


class ImageError(VmmError):
    pass


class KernelOpenError(ImageError):
    """`pyvmm run`'s kernel cannot be opened, said as kvmtool says it ("Fatal: Unable to open kernel
    X", its die()): kvm-unit-tests' runner starts each test once with a kernel that does not exist
    and takes that line to mean the VMM accepted every other option (scripts/runtime.bash)."""

    label = "Fatal"

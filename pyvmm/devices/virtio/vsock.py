"""virtio-vsock (virtio 1.2 §5.10) on the kernel's vhost-vsock (drivers/vhost/vsock.c), as
kvmtool's `--vsock CID` gives it: the guest and the host talk over AF_VSOCK sockets, the guest at
context ID CID, the host at 2 (VMADDR_CID_HOST), and the kernel moves every packet between the
rings and the host's sockets. pyvmm only sets the device up (vhost.py).

The device has three queues: rx (0) and tx (1), which vhost-vsock serves, and the event queue (2),
which stays with the device model (as in kvmtool and QEMU): the only event, TRANSPORT_RESET
(§5.10.6.6), is for a guest that has been moved to another host. The configuration space holds the
guest's CID (§5.10.4, le64). vhost-vsock claims the CID for this process when the device is made,
so a second VM with the same CID is refused there, in one line; it starts and stops the two rings
together (VHOST_VSOCK_SET_RUNNING), once both are set up.
"""

from __future__ import annotations

import argparse
import errno

from pyvmm.devices.virtio.device import DeviceHost, VirtioDevice
from pyvmm.devices.virtio.vhost import RING_FEATURES, KernelVhost, VhostDevice
from pyvmm.errors import KvmIoctlError, VmmError
from pyvmm.kvm.fds import VhostFd

VHOST_VSOCK = "/dev/vhost-vsock"
VIRTIO_ID_VSOCK = 19
RX, TX, EVENT = 0, 1, 2
QUEUE_SIZE = 128  # kvmtool's and QEMU's
VIRTIO_VSOCK_F_SEQPACKET = 1 << 1  # §5.10.3: SOCK_SEQPACKET, where vhost-vsock has it (Linux 5.14)

# §5.10.4 / include/uapi/linux/vm_sockets.h: 0 to 2 are the hypervisor, the loopback and the host,
# and VMADDR_CID_ANY (U32_MAX) is nobody's; vhost-vsock takes 32-bit CIDs only
MIN_GUEST_CID, MAX_GUEST_CID = 3, 0xFFFF_FFFE


def guest_cid(text: str) -> int:
    """`--vsock`'s argument: a guest context ID."""
    try:
        cid = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a context ID (a number)") from None
    if not MIN_GUEST_CID <= cid <= MAX_GUEST_CID:
        raise argparse.ArgumentTypeError(
            f"{cid} is not a guest's context ID ({MIN_GUEST_CID} to {MAX_GUEST_CID}; 0-2 are the hypervisor, "
            "the loopback and the host)")
    return cid


class VhostVsock(VhostDevice):
    """A virtio-vsock device at one CID, its rx and tx rings served by vhost-vsock."""

    device_id = VIRTIO_ID_VSOCK
    name = "vsock"
    queue_sizes = (QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE)
    backend_queues = (RX, TX)

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--vsock", type=guest_cid, metavar="CID",
                            help="a virtio-vsock device: the guest reaches the host (CID 2) over AF_VSOCK and the host "
                                 "reaches the guest at CID, through the kernel's vhost-vsock")

    @classmethod
    def from_args(cls, args: argparse.Namespace, host: DeviceHost) -> list[VirtioDevice]:
        return [] if args.vsock is None else [cls(args.vsock)]

    def __init__(self, cid: int, vhost_path: str = VHOST_VSOCK) -> None:
        """Claims `cid` on this host; raises VmmError in one line if it cannot."""
        super().__init__(f"vhost-vsock for CID {cid}")
        self.cid = cid
        self.running = False  # vhost-vsock serves the rings
        try:
            self.vhost = VhostFd(vhost_path)
        except OSError as e:
            hint = {errno.ENOENT: " (load vhost_vsock)", errno.EACCES: " (pyvmm's user may not open it)"}
            raise VmmError(f"--vsock: cannot open {vhost_path}: {e.strerror}{hint.get(e.errno or 0, '')}") from None
        try:
            self.vhost.vsock_set_guest_cid(cid)
            vhost_features = self.vhost.get_features()
        except KvmIoctlError as e:
            self.vhost.close()
            if e.errno == errno.EADDRINUSE:
                # vhost_vsock_set_cid: another VM's, or this host's own if it is a guest itself
                raise VmmError(f"--vsock: context ID {cid} is taken by another VM on this host, or is the host's own") \
                    from None
            raise VmmError(f"--vsock {cid}: {e}") from None
        self.features = vhost_features & VIRTIO_VSOCK_F_SEQPACKET
        self.transport_features = vhost_features & RING_FEATURES
        self.config = bytearray(cid.to_bytes(8, "little"))
        self.backend = KernelVhost(self.vhost)

    def rings_started(self, started: list[int]) -> None:
        # vhost-vsock runs both rings or neither, and fails to start one the driver left unset
        # (vhost_vsock_start): a driver that readies only one gets a device that stays silent
        if sorted(started) == [RX, TX]:
            self.vhost.vsock_set_running(True)
            self.running = True

    def rings_stopping(self) -> None:
        # vhost_vsock_stop takes each ring's backend away under its lock: the kernel is done
        # with the rings when this returns
        if self.running:
            self.vhost.vsock_set_running(False)
            self.running = False

    def close(self) -> None:
        """Stops the rings and gives the CID back (vhost_vsock_dev_release)."""
        self.vhost.close()

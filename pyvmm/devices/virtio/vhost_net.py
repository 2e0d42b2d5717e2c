"""vhost-net: net.py's virtio-net NIC with the kernel's data plane (drivers/vhost/net.c), as
kvmtool's `-n mode=tap,vhost=1` and QEMU's `vhost=on` give it. Frames move between the rings and
the tap in a kernel thread of this process; pyvmm only sets the device up (vhost.py).

The tap is the one net.py opens, with IFF_VNET_HDR and the 12-byte header of VIRTIO_F_VERSION_1
(§5.1.6): vhost-net hands the guest's header to the tap and the tap's to the guest as they are, so
it is not asked to add one (VHOST_NET_F_VIRTIO_NET_HDR). VIRTIO_NET_F_MRG_RXBUF is offered where
vhost-net offers it, and then the kernel writes num_buffers. The configuration space (MAC, link
up) is pyvmm's, as for net.py's NIC; no offloads are offered.
"""

from __future__ import annotations

import argparse
import logging
import os

from pyvmm.devices.virtio.device import VIRTIO_F_VERSION_1, DeviceHost, VirtioDevice
from pyvmm.devices.virtio.net import (
    QUEUE_SIZE,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_STATUS,
    NetworkSpec,
    VirtioNet,
    net_config,
    parse_network,
    tap_for,
)
from pyvmm.devices.virtio.vhost import RING_FEATURES, KernelVhost, VhostDevice
from pyvmm.errors import VmmError
from pyvmm.kvm.fds import VhostFd
from pyvmm.machine.host import HOST_NOTES

VHOST_NET = "/dev/vhost-net"
VIRTIO_NET_F_MRG_RXBUF = 1 << 15


class VhostNet(VhostDevice):
    """A NIC on vhost-net; its type also holds `-n`, whose NICs are on vhost-net where they can
    be (open_nic)."""

    device_id = 1
    name = "net"
    queue_sizes = (QUEUE_SIZE, QUEUE_SIZE)

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("-n", "--network", action="append", default=[],
                            metavar="mode=tap,tapif=NAME[,guest_mac=MAC][,vhost=0|1]|mode=none",
                            help="a virtio-net NIC on a host tap device, its frames moved by the kernel's "
                                 "vhost-net where /dev/vhost-net opens (vhost=0: by pyvmm); repeatable; "
                                 "mode=none: no NIC")

    @classmethod
    def from_args(cls, args: argparse.Namespace, host: DeviceHost) -> list[VirtioDevice]:
        # kvmtool's mode=none is no NIC at all (virtio/net.c, no_net), whatever else -n says
        specs = [parse_network(n) for n in args.network]
        return [] if any(spec.mode == "none" for spec in specs) else [open_nic(spec) for spec in specs]

    def __init__(self, spec: NetworkSpec, vhost: VhostFd) -> None:
        """A NIC on the tap `spec` names, served by `vhost` (an open /dev/vhost-net), which the
        device owns from here on."""
        super().__init__(f"vhost-net on tap {spec.tapif}")
        self.spec, self.vhost, self.tap = spec, vhost, -1
        try:
            self.tap = tap_for(spec)
            self.vhost_features = vhost.get_features()
        except BaseException:
            self.close()
            raise
        self.features = VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS | (self.vhost_features & VIRTIO_NET_F_MRG_RXBUF)
        self.transport_features = self.vhost_features & RING_FEATURES
        self.config = net_config(spec.mac)
        self.backend = KernelVhost(vhost, self._attach_tap)

    def backend_features(self, driver_features: int) -> int:
        return driver_features & self.vhost_features  # MAC and STATUS are pyvmm's, not the kernel's

    def _attach_tap(self, index: int, on: bool) -> None:
        self.vhost.net_set_backend(index, self.tap if on else -1)

    def close(self) -> None:
        self.vhost.close()
        if self.tap >= 0:
            os.close(self.tap)
            self.tap = -1


def open_nic(spec: NetworkSpec, vhost_path: str = VHOST_NET) -> VirtioDevice:
    """The NIC `spec` asks for: on vhost-net where it may be and `vhost_path` opens, else with
    pyvmm moving the frames, said in one line."""
    if spec.mode != "tap" or not spec.vhost:
        return VirtioNet(spec)
    vhost = None
    try:
        vhost = VhostFd(vhost_path)
        if not vhost.get_features() & VIRTIO_F_VERSION_1:
            raise VmmError("it offers no VIRTIO_F_VERSION_1")
    except (OSError, VmmError) as e:
        if vhost is not None:
            vhost.close()
        why = e.strerror if isinstance(e, OSError) else str(e)
        logging.getLogger(HOST_NOTES).warning(
            "virtio-net: no vhost-net (%s: %s): pyvmm moves the frames of tap %s", vhost_path, why, spec.tapif)
        return VirtioNet(spec)
    return VhostNet(spec, vhost)

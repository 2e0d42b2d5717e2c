"""The virtio device types `pyvmm run` offers, in kvmtool's order of attachment: disks, console,
entropy, network, shared directories, sockets. A new device type: its module, and one line here."""

from __future__ import annotations

from pyvmm.devices.virtio.console import VirtioConsole
from pyvmm.devices.virtio.device import VirtioDevice
from pyvmm.devices.virtio.fs import VirtioFs
from pyvmm.devices.virtio.p9 import Virtio9p
from pyvmm.devices.virtio.rng import VirtioRng
from pyvmm.devices.virtio.vhost_net import VhostNet
from pyvmm.devices.virtio.vhost_user_blk import VhostUserBlk
from pyvmm.devices.virtio.vsock import VhostVsock

CLI_DEVICES: tuple[type[VirtioDevice], ...] = (VhostUserBlk, VirtioConsole, VirtioRng, VhostNet, Virtio9p, VirtioFs,
                                                VhostVsock)

"""virtio-net (virtio 1.2 §5.1) on a host tap device, or with no backend at all.

  -n mode=tap,tapif=NAME[,guest_mac=MAC][,vhost=0|1]
                     frames go to and come from tap NAME (created if it does not exist; the host
                     side configures it), moved by the kernel's vhost-net (vhost_net.py) where
                     /dev/vhost-net opens, else by this module; vhost=0: by this module
  -n mode=none       no NIC, as in kvmtool (its runners pass it to say so)

In the Python API a NetworkSpec of mode "none" is a NIC with its link up and nothing behind it.

The tap is opened with IFF_VNET_HDR and a 12-byte header, the size of struct virtio_net_hdr_v1
(§5.1.6), so a frame's descriptors go to writev/readv as they are: no copy, no header rewrite.
No offloads are offered; the guest checksums and segments itself.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
from collections.abc import Callable
from typing import NamedTuple

from kvm_bindings import ffi, libc
from pyvmm.devices.virtio.device import VirtioDevice
from pyvmm.devices.virtio.rings.chain import Chain
from pyvmm.devices.virtio.rings.layout import IOVEC
from pyvmm.devices.virtio.rings.queue import Virtqueue
from pyvmm.errors import VmmError
from pyvmm.kvm.fds import open_tap

log = logging.getLogger("pyvmm")

RECEIVEQ, TRANSMITQ = 0, 1  # receiveq1, transmitq1 (§5.1.2)
QUEUE_SIZE = 256
HEADER_SIZE = 12  # struct virtio_net_hdr_v1, num_buffers included (VIRTIO_F_VERSION_1)
NUM_BUFFERS = 10  # its offset: le16 num_buffers, 1 without VIRTIO_NET_F_MRG_RXBUF (§5.1.6.4)
VIRTIO_NET_F_MAC = 1 << 5
VIRTIO_NET_F_STATUS = 1 << 16
VIRTIO_NET_S_LINK_UP = 1
DEFAULT_MAC = "02:15:15:15:15:15"  # locally administered, kvmtool's default guest MAC


class NetworkSpec(NamedTuple):
    mode: str  # "tap" or "none"
    tapif: str | None
    mac: bytes
    vhost: bool = True  # the kernel's vhost-net moves the frames, where it can


def parse_mac(text: str) -> bytes:
    parts = text.split(":")
    try:
        if len(parts) != 6 or any(len(p) != 2 for p in parts):
            raise ValueError
        mac = bytes.fromhex("".join(parts))
    except ValueError:
        raise VmmError(f"{text!r} is not a MAC address (xx:xx:xx:xx:xx:xx)") from None
    if mac[0] & 1:
        raise VmmError(f"{text} is a multicast address: a NIC needs a unicast one")
    return mac


def parse_network(spec: str) -> NetworkSpec:
    """`mode=tap,tapif=NAME[,guest_mac=MAC][,vhost=0|1]` or `mode=none[,guest_mac=MAC]`, as
    kvmtool's -n."""
    opts: dict[str, str] = {}
    for item in spec.split(","):
        key, eq, value = item.partition("=")
        if not eq or key not in ("mode", "tapif", "guest_mac", "vhost"):
            raise VmmError(f"network {spec!r}: {item!r} is not mode=, tapif=, guest_mac= or vhost=")
        opts[key] = value
    if opts.get("vhost", "1") not in ("0", "1"):
        raise VmmError(f"network {spec!r}: vhost= is 0 or 1")
    mode = opts.get("mode", "tap" if "tapif" in opts else "")
    if mode not in ("tap", "none"):
        raise VmmError(f"network {spec!r}: mode must be tap or none")
    tapif = opts.get("tapif")
    if mode == "tap" and not tapif:
        raise VmmError(f"network {spec!r}: mode=tap needs tapif=NAME")
    if mode == "none" and tapif:
        raise VmmError(f"network {spec!r}: mode=none takes no tapif")
    if tapif is not None and not 0 < len(tapif.encode()) < 16:
        raise VmmError(f"network {spec!r}: a tap name is 1-15 bytes")
    try:
        mac = parse_mac(opts.get("guest_mac", DEFAULT_MAC))
    except VmmError as e:
        raise VmmError(f"network {spec!r}: {e}") from None
    return NetworkSpec(mode, tapif, mac, opts.get("vhost", "1") == "1")


def net_config(mac: bytes) -> bytearray:
    """struct virtio_net_config (§5.1.4): mac, status (link up), max_virtqueue_pairs."""
    return bytearray(mac + struct.pack("<HH", VIRTIO_NET_S_LINK_UP, 1))


def tap_for(spec: NetworkSpec) -> int:
    """The tap `spec` names, opened with a virtio-net header of HEADER_SIZE bytes."""
    assert spec.tapif is not None
    try:
        return open_tap(spec.tapif, HEADER_SIZE)
    except FileNotFoundError:
        raise VmmError("no /dev/net/tun on this host (load the tun module)") from None
    except PermissionError:
        raise VmmError(f"no permission to open tap {spec.tapif} (CAP_NET_ADMIN is needed)") from None


class VirtioNet(VirtioDevice):
    device_id = 1
    name = "net"
    queue_sizes = (QUEUE_SIZE, QUEUE_SIZE)
    features = VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS

    def __init__(self, spec: NetworkSpec) -> None:
        super().__init__()
        self.spec = spec
        self.config = net_config(spec.mac)
        self.tap = tap_for(spec) if spec.mode == "tap" else None
        self.tx_frames = self.rx_frames = 0
        self.tap_error = ""  # why reading the tap failed, once it has

    def poll_fds(self) -> dict[int, Callable[[], None]]:
        return {} if self.tap is None else {self.tap: self._tap_readable}

    def notify(self, queue: Virtqueue) -> None:
        if queue.index == TRANSMITQ:
            self.serve(queue, self._transmit)
        elif self.tap is not None:  # receive buffers posted: frames can flow again
            self.watch(self.tap, True)
            self._receive(queue)

    def _transmit(self, chain: Chain) -> int:
        if self.tap is None or chain.readable_len < HEADER_SIZE:  # no backend, or no frame: dropped
            return 0
        # one writev from the chain's iovec; a full tap queue or a link that is down makes it
        # fail, and a NIC drops the frame then
        if libc.writev(self.tap, ffi.from_buffer(chain.iov), chain.nr_readable) >= 0:
            self.tx_frames += 1
        return 0

    def _tap_readable(self) -> None:
        assert self.transport is not None and self.tap is not None
        receiveq = self.transport.live_queue(RECEIVEQ)
        if receiveq is not None:
            self._receive(receiveq)
        else:
            self.watch(self.tap, False)  # until the driver is ready and posts buffers

    def _receive(self, queue: Virtqueue) -> None:
        assert self.tap is not None
        while True:
            chain = queue.pop()
            if chain is None:
                if queue.want_notifications():
                    continue
                self.watch(self.tap, False)  # no buffers: leave frames in the tap until some come
                break
            if chain.writable_len < HEADER_SIZE:
                queue.push(chain.head, 0)  # no room for even the header: given back empty, no frame lost
                continue
            writable = ffi.from_buffer(chain.iov[IOVEC.size * chain.nr_readable:])
            n = libc.readv(self.tap, writable, chain.count - chain.nr_readable)
            if n < 0:
                queue.unpop()
                if ffi.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):  # the tap is gone or broken
                    self._tap_failed(ffi.errno)
                break
            if n >= HEADER_SIZE:  # the tap leaves num_buffers alone: the frame is in 1 buffer
                chain.write(chain.readable_len + NUM_BUFFERS, b"\x01\x00")
            queue.push(chain.head, n)
            self.rx_frames += 1
        self.used(queue)

    def _tap_failed(self, err: int) -> None:
        """Stop polling a tap that fails (its interface was deleted, ...): said once; the
        driver's next receive buffers try it again."""
        assert self.tap is not None
        self.watch(self.tap, False)
        if not self.tap_error:
            self.tap_error = os.strerror(err)
            log.warning("virtio-net: reading the tap failed: %s; receiving stops", self.tap_error)

    def close(self) -> None:
        if self.tap is not None:
            os.close(self.tap)

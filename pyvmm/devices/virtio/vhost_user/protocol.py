"""The vhost-user protocol, front-end side (QEMU's docs/interop/vhost-user.rst, "Message
specification"): messages on a Unix stream socket, each a 12-byte header (request, flags, size)
and a payload, with file descriptors passed alongside as SCM_RIGHTS.

Only what a front-end needs to hand a device's rings to a back-end daemon is here: features,
the memory table, ring set-up and teardown, and the device's configuration space (GET_CONFIG;
vhost-user-blk's capacity and limits are the daemon's). Every request that changes state is sent with
NEED_REPLY when the back-end offers REPLY_ACK, so a refusal is reported at the request that
caused it rather than as a closed socket later.
"""

from __future__ import annotations

import array
import struct
from collections.abc import Sequence
from typing import NamedTuple

from pyvmm.errors import VmmError

# Front-end requests (vhost-user.rst, "Front-end message types")
GET_FEATURES = 1
SET_FEATURES = 2
SET_OWNER = 3
SET_MEM_TABLE = 5
SET_VRING_NUM = 8
SET_VRING_ADDR = 9
SET_VRING_BASE = 10
GET_VRING_BASE = 11
SET_VRING_KICK = 12
SET_VRING_CALL = 13
SET_VRING_ERR = 14
GET_PROTOCOL_FEATURES = 15
SET_PROTOCOL_FEATURES = 16
GET_QUEUE_NUM = 17
SET_VRING_ENABLE = 18
GET_CONFIG = 24

NAMES = {GET_FEATURES: "GET_FEATURES", SET_FEATURES: "SET_FEATURES", SET_OWNER: "SET_OWNER",
         SET_MEM_TABLE: "SET_MEM_TABLE", SET_VRING_NUM: "SET_VRING_NUM", SET_VRING_ADDR: "SET_VRING_ADDR",
         SET_VRING_BASE: "SET_VRING_BASE", GET_VRING_BASE: "GET_VRING_BASE", SET_VRING_KICK: "SET_VRING_KICK",
         SET_VRING_CALL: "SET_VRING_CALL", SET_VRING_ERR: "SET_VRING_ERR",
         GET_PROTOCOL_FEATURES: "GET_PROTOCOL_FEATURES", SET_PROTOCOL_FEATURES: "SET_PROTOCOL_FEATURES",
         GET_QUEUE_NUM: "GET_QUEUE_NUM", SET_VRING_ENABLE: "SET_VRING_ENABLE", GET_CONFIG: "GET_CONFIG"}

# Header flags: bits 0-1 the version (1), then REPLY and NEED_REPLY
VERSION = 0x1
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3
HEADER = struct.Struct("<III")

# The feature bit that says the back-end speaks protocol features; once negotiated, rings start
# disabled until SET_VRING_ENABLE (vhost-user.rst, "Ring states")
F_PROTOCOL_FEATURES = 1 << 30
# Protocol features (vhost-user.rst, "Protocol features")
PROTOCOL_F_MQ = 1 << 0
PROTOCOL_F_REPLY_ACK = 1 << 3
PROTOCOL_F_CONFIG = 1 << 9
WANTED_PROTOCOL_FEATURES = PROTOCOL_F_MQ | PROTOCOL_F_REPLY_ACK
PROTOCOL_NAMES = {PROTOCOL_F_CONFIG: "VHOST_USER_PROTOCOL_F_CONFIG"}

U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")  # index, num
VRING_ADDR = struct.Struct("<IIQQQQ")  # index, flags, descriptor, used, available, log: front-end addresses
MEMORY_HEADER = struct.Struct("<II")  # nregions, padding
MEMORY_REGION = struct.Struct("<QQQQ")  # guest_phys_addr, memory_size, userspace_addr, mmap_offset
CONFIG_HEADER = struct.Struct("<III")  # struct vhost_user_config: offset, size, flags, then the bytes
MAX_CONFIG = 256  # VHOST_USER_MAX_CONFIG_SIZE
MAX_REGIONS = 8  # VHOST_MEMORY_BASELINE_NREGIONS: what SET_MEM_TABLE carries
NO_FD = 1 << 8  # in SET_VRING_KICK/CALL's u64: no descriptor comes with the message
MAX_PAYLOAD = 4096
REPLY_TIMEOUT = 4.0  # s: a back-end that stops answering fails the request within the life cycle's
# stop grace (5 s), never holding a vCPU longer


class VhostUserError(VmmError):
    """The back-end refused a request, answered nonsense, or went away."""


class MemoryRegion(NamedTuple):
    """One entry of the memory table: guest-physical range, where the front-end maps it, and the
    descriptor the back-end maps it from (at `mmap_offset`)."""

    guest_phys_addr: int
    size: int
    userspace_addr: int
    mmap_offset: int
    fd: int


class VhostUserConnection:
    """One front-end connection to a back-end's socket. Requests are made one at a time, by
    whoever holds the device (the transport serialises them)."""

    def __init__(self, path: str, what: str) -> None:
        # socket is loaded by the first vhost-user device, not by every `pyvmm run` (which
        # imports this module with the device types it offers)
        import socket

        self.what = what  # "virtio-fs TAG", for messages
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.sock.connect(path)
        except OSError as e:
            self.sock.close()
            raise VhostUserError(f"{what}: cannot connect to the vhost-user socket {path}: "
                                 f"{e.strerror or e}") from None
        self.sock.settimeout(REPLY_TIMEOUT)
        self.reply_ack = False
        self.protocol_features = 0  # negotiated by handshake()

    def close(self) -> None:
        self.sock.close()

    def fileno(self) -> int:
        return self.sock.fileno()

    # --- the messages ----------------------------------------------------------------------
    def handshake(self, needed: int = 0) -> tuple[int, int]:
        """SET_OWNER and the protocol features (with `needed`, those the device cannot do
        without); the back-end's virtio features and its number of queues (0 if it does not say)."""
        features = self._get_u64(GET_FEATURES)
        if not features & F_PROTOCOL_FEATURES:
            raise VhostUserError(f"{self.what}: the back-end does not offer protocol features "
                                 "(VHOST_USER_F_PROTOCOL_FEATURES), which pyvmm needs to enable its rings")
        offered = self._get_u64(GET_PROTOCOL_FEATURES)
        for bit, name in PROTOCOL_NAMES.items():
            if needed & bit and not offered & bit:
                raise VhostUserError(f"{self.what}: the back-end does not offer {name}")
        chosen = offered & (WANTED_PROTOCOL_FEATURES | needed)
        self.protocol_features = chosen
        self._send(SET_PROTOCOL_FEATURES, U64.pack(chosen))
        self.reply_ack = bool(chosen & PROTOCOL_F_REPLY_ACK)
        self._request(SET_OWNER)
        queues = self._get_u64(GET_QUEUE_NUM) if chosen & PROTOCOL_F_MQ else 0
        return features, queues

    def set_features(self, features: int) -> None:
        self._request(SET_FEATURES, U64.pack(features | F_PROTOCOL_FEATURES))

    def set_mem_table(self, regions: Sequence[MemoryRegion]) -> None:
        if not 0 < len(regions) <= MAX_REGIONS:
            raise VhostUserError(f"{self.what}: {len(regions)} memory regions (SET_MEM_TABLE takes 1 to 8)")
        payload = MEMORY_HEADER.pack(len(regions), 0) + b"".join(
            MEMORY_REGION.pack(r.guest_phys_addr, r.size, r.userspace_addr, r.mmap_offset) for r in regions)
        self._request(SET_MEM_TABLE, payload, [r.fd for r in regions])

    def start_ring(self, index: int, size: int, base: int, desc: int, avail: int, used: int, kick: int,
                   call: int) -> None:
        """A ring from avail index `base`: size, addresses (front-end virtual addresses), base,
        then the call eventfd before the kick one (a back-end starts a ring at its kick fd, and
        must have somewhere to signal by then), then enabled."""
        self._request(SET_VRING_NUM, VRING_STATE.pack(index, size))
        self._request(SET_VRING_ADDR, VRING_ADDR.pack(index, 0, desc, used, avail, 0))
        self._request(SET_VRING_BASE, VRING_STATE.pack(index, base))
        self._request(SET_VRING_CALL, U64.pack(index), [call])
        self._request(SET_VRING_KICK, U64.pack(index), [kick])
        self._request(SET_VRING_ENABLE, VRING_STATE.pack(index, 1))

    def get_config(self, size: int) -> bytes:
        """The first `size` bytes of the device's configuration space, as the back-end has it
        (GET_CONFIG; the reply repeats offset, size and flags; an empty one is a refusal)."""
        if not self.protocol_features & PROTOCOL_F_CONFIG:
            raise VhostUserError(f"{self.what}: GET_CONFIG needs VHOST_USER_PROTOCOL_F_CONFIG")
        assert 0 < size <= MAX_CONFIG
        reply = self._call(GET_CONFIG, CONFIG_HEADER.pack(0, size, 0) + bytes(size))
        if len(reply) == 0 or len(reply) == CONFIG_HEADER.size and CONFIG_HEADER.unpack(reply)[1] == 0:
            raise VhostUserError(f"{self.what}: the back-end refused GET_CONFIG")
        offset, got, _ = CONFIG_HEADER.unpack_from(reply) if len(reply) >= CONFIG_HEADER.size else (0, 0, 0)
        if offset != 0 or got != size or len(reply) != CONFIG_HEADER.size + size:
            raise VhostUserError(f"{self.what}: a malformed GET_CONFIG reply (offset {offset}, {got} of "
                                 f"{size} bytes)")
        return reply[CONFIG_HEADER.size:]

    def stop_ring(self, index: int) -> int:
        """GET_VRING_BASE: the back-end stops the ring and says where it was."""
        reply = self._call(GET_VRING_BASE, VRING_STATE.pack(index, 0))
        if len(reply) != VRING_STATE.size or VRING_STATE.unpack(reply)[0] != index:
            raise VhostUserError(f"{self.what}: a malformed GET_VRING_BASE reply")
        return int(VRING_STATE.unpack(reply)[1])

    # --- the wire ------------------------------------------------------------------------
    def _get_u64(self, request: int) -> int:
        reply = self._call(request)
        if len(reply) != U64.size:
            raise VhostUserError(f"{self.what}: a malformed {NAMES[request]} reply")
        return int(U64.unpack(reply)[0])

    def _request(self, request: int, payload: bytes = b"", fds: Sequence[int] = ()) -> None:
        """A request without a reply of its own: acknowledged (REPLY_ACK) where negotiated."""
        if not self.reply_ack:
            self._send(request, payload, fds)
            return
        reply = self._call(request, payload, fds, FLAG_NEED_REPLY)
        if len(reply) != U64.size:
            raise VhostUserError(f"{self.what}: a malformed acknowledgement of {NAMES[request]}")
        status = U64.unpack(reply)[0]
        if status != 0:
            raise VhostUserError(f"{self.what}: the back-end refused {NAMES[request]} (status {status})")

    def _call(self, request: int, payload: bytes = b"", fds: Sequence[int] = (), flags: int = 0) -> bytes:
        self._send(request, payload, fds, flags)
        header = self._recv_exactly(HEADER.size, request)
        got, rflags, size = HEADER.unpack(header)
        if got != request or not rflags & FLAG_REPLY or size > MAX_PAYLOAD:
            raise VhostUserError(f"{self.what}: an unexpected reply to {NAMES[request]} "
                                 f"(request {got}, flags {rflags:#x}, size {size})")
        return self._recv_exactly(size, request)

    def _send(self, request: int, payload: bytes = b"", fds: Sequence[int] = (), flags: int = 0) -> None:
        import socket  # loaded by __init__ already

        message = HEADER.pack(request, VERSION | flags, len(payload)) + payload
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        try:
            sent = self.sock.sendmsg([message], ancillary)
            if sent < len(message):
                self.sock.sendall(message[sent:])
        except OSError as e:
            raise VhostUserError(f"{self.what}: the back-end is gone ({NAMES[request]}: "
                                 f"{e.strerror or e})") from None

    def _recv_exactly(self, size: int, request: int) -> bytes:
        data = bytearray()
        while len(data) < size:
            try:
                chunk = self.sock.recv(size - len(data))
            except OSError as e:
                raise VhostUserError(f"{self.what}: the back-end is gone ({NAMES[request]}: "
                                     f"{e.strerror or e})") from None
            if not chunk:
                raise VhostUserError(f"{self.what}: the back-end closed the connection "
                                     f"(answering {NAMES[request]})")
            data += chunk
        return bytes(data)

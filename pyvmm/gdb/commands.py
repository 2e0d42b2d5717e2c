"""The GDB packets that inspect a stopped guest, answered against a Target (the VM seen as a
debugger sees it). Threads are vCPUs: vCPU N is thread N + 1, since GDB's thread 0 means "any"
and -1 "all" (GDB manual, "Packets", thread-id). Resuming (c, s, vCont) and breakpoints belong
to the session that owns the vCPUs; this module only reads and writes their state.

Replies follow the manual: "" for a packet not supported, "OK", "E NN" for an error, hex for
data. An address GDB gives is a guest virtual address, translated by the target.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from pyvmm.gdb import registers as regs

PACKET_SIZE = 0x4000
EFAULT, EINVAL, ESRCH = 14, 22, 3
SIGTRAP = 5


class MemoryFault(Exception):
    """The address is not mapped in the guest (or not in RAM)."""


class Target(Protocol):
    layout: regs.Layout  # the vCPUs' registers, the same for every vCPU of a VM

    def vcpus(self) -> int: ...

    def read_registers(self, cpu: int) -> list[int]:
        """Every register in `layout` order."""

    def write_register(self, cpu: int, number: int, value: int) -> None: ...

    def read_memory(self, cpu: int, address: int, length: int) -> bytes:
        """`length` bytes at virtual `address` as vCPU `cpu` sees them; MemoryFault if any is unmapped."""

    def write_memory(self, cpu: int, address: int, data: bytes) -> None: ...


def error(code: int) -> bytes:
    return f"E{code:02x}".encode()


class Inspector:
    """Answers the inspection packets; `selected` is the thread `Hg` chose (vCPU index)."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.selected = 0
        self.no_ack = False
        self.stopped_cpu = 0  # whose stop `?` reports
        self._handlers: dict[bytes, Callable[[bytes], bytes]] = {
            b"g": self._read_all, b"G": self._write_all, b"p": self._read_one, b"P": self._write_one,
            b"m": self._read_memory, b"M": self._write_memory, b"X": self._write_binary,
            b"H": self._select, b"T": self._alive, b"?": self._why,
        }

    def handle(self, data: bytes) -> bytes:
        """The reply to one packet's data ("" when it is not one of these)."""
        try:
            if data.startswith(b"q") or data.startswith(b"Q"):
                return self._query(data)
            handler = self._handlers.get(data[:1])
            return handler(data[1:]) if handler is not None else b""
        except MemoryFault:
            return error(EFAULT)
        except (ValueError, IndexError):  # malformed numbers or fields
            return error(EINVAL)

    # --- queries -----------------------------------------------------------------------------
    def _query(self, data: bytes) -> bytes:
        name, _, args = data.partition(b":")
        if name == b"qSupported":
            return (f"PacketSize={PACKET_SIZE:x};qXfer:features:read+;QStartNoAckMode+;"
                    "vContSupported+").encode()
        if name == b"QStartNoAckMode":
            self.no_ack = True
            return b"OK"
        if name == b"qXfer" and args.startswith(b"features:read:target.xml:"):
            offset, length = (int(x, 16) for x in args.rsplit(b":", 1)[1].split(b","))
            xml = self.target.layout.target_xml
            chunk = xml[offset:offset + length]
            return (b"l" if offset + len(chunk) >= len(xml) else b"m") + chunk
        if name == b"qfThreadInfo":
            return b"m" + b",".join(f"{cpu + 1:x}".encode() for cpu in range(self.target.vcpus()))
        if name == b"qsThreadInfo":
            return b"l"
        if name == b"qC":
            return f"QC{self.selected + 1:x}".encode()
        if name == b"qAttached":
            return b"1"  # an existing guest: detaching leaves it running
        if name.startswith(b"qThreadExtraInfo,"):
            cpu = self.thread(name.split(b",", 1)[1])
            return f"vCPU {cpu}".encode().hex().encode()
        return b""

    # --- registers ---------------------------------------------------------------------------
    def _read_all(self, _: bytes) -> bytes:
        return self.target.layout.encode_all(self.target.read_registers(self.selected))

    def _write_all(self, text: bytes) -> bytes:
        values = self.target.layout.decode_all(text)
        for number, value in enumerate(values):
            self.target.write_register(self.selected, number, value)
        return b"OK"

    def _read_one(self, text: bytes) -> bytes:
        number, layout = int(text, 16), self.target.layout
        if not 0 <= number < len(layout.registers):
            return error(EINVAL)
        return layout.encode(number, self.target.read_registers(self.selected)[number])

    def _write_one(self, text: bytes) -> bytes:
        number_text, _, value = text.partition(b"=")
        number, layout = int(number_text, 16), self.target.layout
        if not 0 <= number < len(layout.registers):
            return error(EINVAL)
        self.target.write_register(self.selected, number, layout.decode(number, value))
        return b"OK"

    # --- memory ------------------------------------------------------------------------------
    def _span(self, text: bytes) -> tuple[int, int]:
        address, length = (int(x, 16) for x in text.split(b",", 1))
        if length > PACKET_SIZE // 2 or address < 0 or address + length > 1 << 64:
            raise ValueError("span")
        return address, length

    def _read_memory(self, text: bytes) -> bytes:
        address, length = self._span(text)
        return self.target.read_memory(self.selected, address, length).hex().encode()

    def _write_memory(self, text: bytes) -> bytes:
        span, _, data = text.partition(b":")
        address, length = self._span(span)
        raw = bytes.fromhex(data.decode("ascii"))
        if len(raw) != length:
            return error(EINVAL)
        self.target.write_memory(self.selected, address, raw)
        return b"OK"

    def _write_binary(self, text: bytes) -> bytes:
        span, _, raw = text.partition(b":")  # the reader has undone the escapes already
        address, length = self._span(span)
        if len(raw) != length:
            return error(EINVAL)
        if length:
            self.target.write_memory(self.selected, address, raw)
        return b"OK"

    # --- threads -----------------------------------------------------------------------------
    def thread(self, text: bytes) -> int:
        """The vCPU a thread-id names (0 and -1: the current one)."""
        number = int(text, 16) if text not in (b"-1", b"0") else self.selected + 1
        if not 1 <= number <= self.target.vcpus():
            raise IndexError(number)
        return number - 1

    def _select(self, text: bytes) -> bytes:
        op, which = text[:1], text[1:]
        if op not in (b"g", b"c"):
            return b""
        try:
            cpu = self.thread(which)
        except IndexError:
            return error(ESRCH)
        if op == b"g":
            self.selected = cpu
        return b"OK"

    def _alive(self, text: bytes) -> bytes:
        try:
            self.thread(text)
        except IndexError:
            return error(ESRCH)
        return b"OK"

    def _why(self, _: bytes) -> bytes:
        return f"T{SIGTRAP:02x}thread:{self.stopped_cpu + 1:x};".encode()

"""The GDB remote serial protocol's framing (GDB manual, "Remote Protocol", "Overview"):
`$DATA#CK`, CK the two-hex-digit sum of DATA's bytes modulo 256, acknowledged with `+` (or `-` to
ask for it again) until the client turns acknowledgements off (QStartNoAckMode). In DATA, `#`,
`$`, `}` and `*` are escaped as `}` followed by the byte XOR 0x20, and `X*N` repeats X
N - 29 more times (run-length encoding). A lone 0x03 outside a packet is an interrupt (Ctrl-C).

The reader is a state machine fed bytes as they come from the socket: it never blocks, holds at
most one packet of PACKET_SIZE bytes, and turns anything malformed into an event instead of an
exception, so a client that sends garbage or vanishes mid-packet cannot upset the stub.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

PACKET_SIZE = 0x4000  # what qSupported's PacketSize advertises: the longest DATA accepted
INTERRUPT = 0x03
ESCAPE, RLE = ord("}"), ord("*")
NEEDS_ESCAPE = frozenset(b"#$}*")
RLE_BIAS = 29  # the repeat count's character is the count + 29 (GDB manual, "Overview")
RLE_MAX = 126 - RLE_BIAS  # the largest count a printable character can carry
HEX = frozenset(b"0123456789abcdefABCDEF")


@dataclass(frozen=True)
class Packet:
    data: bytes  # unescaped, run-length decoded


@dataclass(frozen=True)
class Ack:
    good: bool  # `+`, or `-`: send the last reply again


@dataclass(frozen=True)
class Interrupt:
    pass


@dataclass(frozen=True)
class Malformed:
    """A packet that cannot be used (bad checksum, too long, bad escape): the stub answers `-`."""

    why: str


Event = Packet | Ack | Interrupt | Malformed


def checksum(data: bytes) -> int:
    return sum(data) & 0xFF


def escape(data: bytes) -> bytes:
    out = bytearray()
    for b in data:
        if b in NEEDS_ESCAPE:
            out += bytes((ESCAPE, b ^ 0x20))
        else:
            out.append(b)
    return bytes(out)


def run_length(data: bytes) -> bytes:
    """`data` (already escaped) with runs of four or more bytes encoded as X*N. A count whose
    character would be `#` or `$` (6 or 7 repeats) is cut to 5, and the rest goes on as a run
    of its own, as GDB's own stub does."""
    out = bytearray()
    i = 0
    while i < len(data):
        b = data[i]
        run = 1
        while i + run < len(data) and data[i + run] == b and run <= RLE_MAX:
            run += 1
        repeats = run - 1
        if repeats in (6, 7):
            repeats = 5
        if repeats >= 3 and b != ESCAPE:  # an escape's second byte must follow it unrepeated
            out += bytes((b, RLE, repeats + RLE_BIAS))
            i += repeats + 1
        else:
            out.append(b)
            i += 1
    return bytes(out)


def frame(data: bytes, *, compress: bool = False) -> bytes:
    """One packet on the wire for DATA (a reply: escaped, optionally run-length encoded)."""
    body = escape(data)
    if compress:
        body = run_length(body)
    return b"$" + body + b"#" + f"{checksum(body):02x}".encode()


def decode(body: bytes) -> bytes:
    """DATA from a packet's body: escapes undone, runs expanded. ValueError when malformed."""
    out = bytearray()
    i = 0
    while i < len(body):
        b = body[i]
        if b == ESCAPE:
            if i + 1 >= len(body):
                raise ValueError("an escape at the end of the packet")
            out.append(body[i + 1] ^ 0x20)
            i += 2
        elif b == RLE:
            if not out or i + 1 >= len(body):
                raise ValueError("a run-length marker with nothing to repeat")
            count = body[i + 1] - RLE_BIAS
            if count < 0:
                raise ValueError("a run-length count below zero")
            out += bytes((out[-1],)) * count
            i += 2
        else:
            out.append(b)
            i += 1
        if len(out) > PACKET_SIZE:
            raise ValueError(f"longer than {PACKET_SIZE} bytes")
    return bytes(out)


class Reader:
    """Turns the bytes a client sends into events. Bytes outside a packet other than `+`, `-`
    and 0x03 are ignored, as GDB's stubs do."""

    def __init__(self) -> None:
        self._body: bytearray | None = None  # inside a packet: its body so far
        self._escaping = False  # the last body byte was '}': the next one is data, even '#'
        self._digits: bytearray | None = None  # after '#': the checksum digits so far

    def feed(self, data: bytes) -> Iterator[Event]:
        for b in data:
            if self._digits is not None:
                self._digits.append(b)
                if len(self._digits) == 2:
                    yield self._finish(bytes(self._digits))
            elif self._body is None:
                if b == ord("$"):
                    self._body = bytearray()
                elif b == ord("+"):
                    yield Ack(True)
                elif b == ord("-"):
                    yield Ack(False)
                elif b == INTERRUPT:
                    yield Interrupt()
            elif self._escaping:
                self._body.append(b)
                self._escaping = False
            elif b == ord("#"):
                self._digits = bytearray()
            elif b == ord("$"):  # a new packet begins inside one: the old one was cut short
                yield Malformed("a packet cut short")
                self._body = bytearray()
            else:
                self._body.append(b)
                self._escaping = b == ESCAPE
                if len(self._body) > 2 * PACKET_SIZE:  # even escaped, no DATA we accept is longer
                    yield Malformed(f"longer than {PACKET_SIZE} bytes")
                    self._body, self._escaping = None, False

    def _finish(self, digits: bytes) -> Event:
        body = bytes(self._body or b"")
        self._body, self._digits, self._escaping = None, None, False
        if not all(c in HEX for c in digits):
            return Malformed(f"checksum {digits!r} is not hex")
        want = int(digits, 16)
        if checksum(body) != want:
            return Malformed(f"checksum {want:02x}, the data sums to {checksum(body):02x}")
        try:
            return Packet(decode(body))
        except ValueError as e:
            return Malformed(str(e))

"""The GDB remote protocol's framing: checksums, escapes, run-length encoding, acks, interrupts,
and what the reader makes of malformed or cut-short input."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvmm.gdb import packets as p


def test_a_packet_is_framed_with_its_checksum() -> None:
    assert p.frame(b"OK") == b"$OK#9a"
    assert p.frame(b"") == b"$#00"
    assert list(p.Reader().feed(b"$qSupported:multiprocess+#c6")) == [p.Packet(b"qSupported:multiprocess+")]


def test_special_bytes_are_escaped_both_ways() -> None:
    data = b"a#b$c}d*e"
    framed = p.frame(data)
    assert framed == b"$a}\x03b}\x04c}]d}\ne#" + f"{p.checksum(framed[1:-3]):02x}".encode()
    assert list(p.Reader().feed(framed)) == [p.Packet(data)]


def test_run_length_encoding_round_trips_and_avoids_hash_and_dollar() -> None:
    for n in range(1, 200):
        data = b"0" * n + b"x"
        body = p.run_length(p.escape(data))
        assert b"#" not in body and b"$" not in body
        assert p.decode(body) == data, n
    assert p.run_length(b"0000000000") == b"0*&"  # ten zeros: '0' and nine more ('&' = 9 + 29)


def test_acks_interrupts_and_noise_between_packets() -> None:
    events = list(p.Reader().feed(b"+-\x03garbage$g#67+"))
    assert events == [p.Ack(True), p.Ack(False), p.Interrupt(), p.Packet(b"g"), p.Ack(True)]


@pytest.mark.parametrize(("wire", "why"), [
    (b"$g#00", "checksum 00, the data sums to 67"),
    (b"$g#zz", "is not hex"),
    (b"$g#+7", "is not hex"),
    (b"$abc$g#67", "a packet cut short"),
    (b"$*5#5f", "nothing to repeat"),
    (b"$a*\x01#" + f"{(ord('a') + ord('*') + 1) & 0xFF:02x}".encode(), "below zero"),
])
def test_malformed_packets_become_events_not_exceptions(wire: bytes, why: str) -> None:
    events = list(p.Reader().feed(wire))
    assert isinstance(events[0], p.Malformed) and why in events[0].why, events
    if wire.startswith(b"$abc$"):
        assert events[1:] == [p.Packet(b"g")]  # the packet after the cut one is read


def test_an_endless_packet_is_dropped_at_the_size_limit() -> None:
    r = p.Reader()
    events = list(r.feed(b"$" + b"x" * (2 * p.PACKET_SIZE + 10)))
    assert events == [p.Malformed(f"longer than {p.PACKET_SIZE} bytes")]
    assert list(r.feed(b"$g#67")) == [p.Packet(b"g")]  # and the reader goes on
    big = b"0" + b"*~" * (p.PACKET_SIZE // 97 + 1)  # run-length that expands past the limit
    events = list(p.Reader().feed(b"$" + big + b"#" + f"{p.checksum(big):02x}".encode()))
    assert isinstance(events[0], p.Malformed) and "longer than" in events[0].why


def test_a_packet_may_arrive_a_byte_at_a_time() -> None:
    r = p.Reader()
    out = []
    for b in p.frame(b"m1000,4}"):
        out += list(r.feed(bytes((b,))))
    assert out == [p.Packet(b"m1000,4}")]


@given(st.binary(max_size=300), st.booleans(), st.integers(0, 2**32))
def test_any_data_survives_framing_and_any_split(data: bytes, compress: bool, seed: int) -> None:
    wire = p.frame(data, compress=compress)
    rnd = random.Random(seed)
    r, out, i = p.Reader(), [], 0
    while i < len(wire):
        n = rnd.randrange(1, 8)
        out += list(r.feed(wire[i:i + n]))
        i += n
    assert out == [p.Packet(data)]


@given(st.binary(max_size=200))
def test_random_bytes_never_raise(noise: bytes) -> None:
    for event in p.Reader().feed(noise):
        assert isinstance(event, (p.Packet, p.Ack, p.Interrupt, p.Malformed))

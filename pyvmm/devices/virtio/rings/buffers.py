"""Scatter-gather lists as devices see them: a request's buffers are a list of memoryviews of
guest RAM, and a request's framing is the driver's choice (virtio 1.2 §2.6.4), so a header may
span buffers or share one with data."""

from __future__ import annotations


def split(buffers: list[memoryview], at: int) -> tuple[list[memoryview], list[memoryview]]:
    """Buffers for the first `at` bytes and for the rest (§2.6.4: framing is the driver's
    choice, so a header may span descriptors or share one with data)."""
    head: list[memoryview] = []
    for i, b in enumerate(buffers):
        if at <= 0:
            return head, buffers[i:]
        if len(b) <= at:
            head.append(b)
            at -= len(b)
        else:
            head.append(b[:at])
            return head, [b[at:], *buffers[i + 1:]]
    return head, []


def fill(buffers: list[memoryview], data: bytes) -> int:
    """Copy `data` into the buffers as far as they reach; returns the bytes copied."""
    done = 0
    for b in buffers:
        n = min(len(b), len(data) - done)
        b[:n] = data[done:done + n]
        done += n
        if done == len(data):
            break
    return done


def gather(buffers: list[memoryview], n: int) -> bytes:
    """The first `n` bytes of the buffers (fewer if they hold less)."""
    out = bytearray()
    for b in buffers:
        if len(out) >= n:
            break
        out += b[:n - len(out)]
    return bytes(out)


def limit(buffers: list[memoryview], n: int) -> list[memoryview]:
    """The buffers cut to their first `n` bytes."""
    out: list[memoryview] = []
    for b in buffers:
        if n <= 0:
            break
        out.append(b[:n])
        n -= len(b[:n])
    return out

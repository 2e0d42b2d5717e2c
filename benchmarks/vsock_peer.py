"""The guest's side of benchmarks/vsock.py: standard library only, so that any Python in any guest
(or on the host, for the floor) runs it. `python3 vsock_peer.py CID PORT` connects to the server
at CID:PORT and prints, with its own clock:
  BENCH-VSOCK-DOWN MB/s   the server sends SIZE bytes
  BENCH-VSOCK-UP MB/s     it sends SIZE bytes and waits for the server's one-byte receipt
  BENCH-VSOCK-RTT us      a one-byte round trip, the median of ROUND_TRIPS
Each is the median of RUNS, each on a connection of its own (an opening byte says which).
"""

from __future__ import annotations

import socket
import statistics
import sys
import time

SIZE = 16 << 20
RUNS = 3
ROUND_TRIPS = 500
CHUNK = 1 << 16


def connect(cid: int, port: int, op: bytes) -> socket.socket:
    s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    s.connect((cid, port))
    s.sendall(op)
    return s


def down(cid: int, port: int) -> float:
    with connect(cid, port, b"D") as s:
        started, left = time.monotonic(), SIZE
        while left:
            got = len(s.recv(CHUNK))
            if not got:
                raise SystemExit("the server closed early")
            left -= got
        return SIZE / (time.monotonic() - started) / 1e6


def up(cid: int, port: int) -> float:
    block = bytes(CHUNK)
    with connect(cid, port, b"U") as s:
        started = time.monotonic()
        for _ in range(SIZE // CHUNK):
            s.sendall(block)
        if s.recv(1) != b"k":
            raise SystemExit("no receipt from the server")
        return SIZE / (time.monotonic() - started) / 1e6


def round_trip_us(cid: int, port: int) -> float:
    times = []
    with connect(cid, port, b"P") as s:
        for _ in range(ROUND_TRIPS):
            started = time.monotonic()
            s.sendall(b"p")
            if s.recv(1) != b"p":
                raise SystemExit("no echo from the server")
            times.append((time.monotonic() - started) * 1e6)
    return statistics.median(times)


def main() -> None:
    cid, port = int(sys.argv[1]), int(sys.argv[2])
    print("BENCH-VSOCK-DOWN", statistics.median(down(cid, port) for _ in range(RUNS)), flush=True)
    print("BENCH-VSOCK-UP", statistics.median(up(cid, port) for _ in range(RUNS)), flush=True)
    print("BENCH-VSOCK-RTT", round_trip_us(cid, port), flush=True)


if __name__ == "__main__":
    main()

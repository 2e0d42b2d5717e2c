"""virtio-blk's per-request cost on the host side, without KVM: `python -m benchmarks.virtio_path
[--profile]`.

What a guest's `dd if=/dev/vda of=/dev/null bs=4k iflag=direct` asks of pyvmm, one request at
a time, with the unit tests' fake VM (anonymous guest RAM, no KVM) and the transport's real
worker thread. A request is laid out as Linux's virtio_blk and virtio_ring lay it out with
VIRTIO_F_INDIRECT_DESC and VIRTIO_F_EVENT_IDX negotiated: one indirect descriptor whose table
holds the 16-byte header (readable), 4 KiB of data and the status byte (writable). The driver
side does what KVM and the guest would: it makes the chain available, signals the queue's kick
eventfd (as KVM's ioeventfd does) when avail_event asks for a notification, and sleeps on the
irqfd until the device interrupts.

  end to end  kick -> worker wakes -> request served -> irqfd -> driver woken, wall-clock and the
              process's CPU time; the driver's own Python (posting, checking) is in both. This
              driver posts its next request far sooner than a guest does: a worker that re-arms
              notifications only after its interrupt finds it already there and serves it
              without a kick or a wake-up, which no guest under TCG gives it;
  in thread   the worker's kick handler called directly (worker stopped), in that thread's CPU
              time around the call alone: pyvmm's Python and system calls, no thread hop;
  bytecodes   Python bytecodes and calls the kick handler runs per request: counts no busy host
              disturbs (the timings above vary by tens of percent from run to run on one);
  --profile   cProfile of the in-thread path, the top functions by their own time;
  ISR load    the guest's InterruptStatus load after each interrupt, the one MMIO exit of a
              request, through the real vCPU loop on a fake vCPU fd: as the hot register it is
              (devices/bus.py) and through the bus, in bytecodes and CPU time.

Microseconds from an x86 host are for before/after comparisons. Under TCG (the emulated arm64
host) each bytecode and system call costs some 50x more, so there the bytecodes and the worker's
system calls per request (preadv and the irqfd write, besides its epoll_wait) are what count.
No KVM is involved, so this runs anywhere the unit tests run.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from types import FrameType
from typing import Any, cast

from benchmarks.common import median
from pyvmm.devices.virtio import mmio_registers as reg
from pyvmm.devices.virtio.blk import SECTOR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VirtioBlk
from pyvmm.devices.virtio.rings.layout import DESC, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from pyvmm.devices.virtio.transport import VirtioMmio
from pyvmm.kvm.fds import VcpuFd
from pyvmm.machine.exit_dispatch import MachineExits, UnhandledMmio
from pyvmm.machine.irq_lines import IrqFd
from pyvmm.machine.vcpu import Vcpu
from pyvmm.smccc.dispatcher import Dispatcher
from tests.unit.fakes import FakeVcpuFd
from tests.unit.virtio_driver import Driver, FakeVm

REQUESTS = 2000
RUNS = 5
BLOCK = 4096
DISK_BLOCKS = 256  # a 1 MiB image, in the host's page cache after the first pass


class BlkBench:
    """One virtio-blk device on a fake VM and a driver that keeps one 4 KiB read in flight."""

    def __init__(self, image: str) -> None:
        self.vm = FakeVm()
        self.blk = VirtioBlk(image, lock=False)
        self.t: VirtioMmio = self.vm.attach(self.blk)
        d = Driver(self.t, self.vm.memory)
        d.init()
        self.d, self.q = d, d.queues[0]
        self.kick_fd = self.t.kick_fd(0)
        assert isinstance(self.t.irq, IrqFd)
        self.irq_fd = self.t.irq.fd
        self.header = d.buffer(bytes(16))
        self.data = d.buffer(bytes(BLOCK))
        self.status = d.buffer(b"\xff")
        table = d.buffer(bytes(3 * DESC.size))
        for k, (addr, length, flags) in enumerate(((self.header, 16, 0), (self.data, BLOCK, VIRTQ_DESC_F_WRITE),
                                                   (self.status, 1, VIRTQ_DESC_F_WRITE))):
            more = VIRTQ_DESC_F_NEXT if k < 2 else 0
            d.mem.write(table + DESC.size * k, DESC.pack(addr, length, flags | more, k + 1))
        self.q.put_desc(0, table, 3 * DESC.size, VIRTQ_DESC_F_INDIRECT)
        self.sent = 0

    def post(self) -> bool:
        """Make the next read available and ask for an interrupt when it is used (used_event,
        as Linux's virtqueue_enable_cb does); True if the device asked to be notified of it
        (avail_event, §2.7.10)."""
        q, mem = self.q, self.d.mem
        sector = (self.sent % DISK_BLOCKS) * (BLOCK // SECTOR)
        mem.write(self.header, struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, sector))
        mem.write(q.avail + 4 + 2 * q.size, struct.pack("<H", q.used_seen))  # used_event
        old = q.avail_idx
        q.publish_head(0)
        self.sent += 1
        avail_event: int = struct.unpack("<H", mem.read(q.used + 4 + 8 * q.size, 2))[0]
        return (q.avail_idx - avail_event - 1) & 0xFFFF < (q.avail_idx - old) & 0xFFFF

    def collect(self) -> None:
        """The used element of the request in flight, checked."""
        q = self.q
        assert q.used_idx() == (q.used_seen + 1) & 0xFFFF, "the request was not used"
        head, written = q.wait_used()[0]
        assert head == 0 and written == BLOCK + 1, (head, written)
        assert self.d.mem.read(self.status, 1)[0] == VIRTIO_BLK_S_OK

    def end_to_end(self, n: int) -> tuple[float, float]:
        """Mean microseconds per request through the worker thread: wall-clock, and CPU time
        of the whole process (both threads; steadier on a busy host)."""
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(n):
            if self.post():
                os.eventfd_write(self.kick_fd, 1)
            os.eventfd_read(self.irq_fd)  # blocks until the device interrupts
            self.collect()
        return (time.perf_counter() - start) / n * 1e6, (time.process_time() - cpu) / n * 1e6

    def stop_worker(self) -> Callable[[], None]:
        """Stop the worker thread and return its handler for the queue's kicks."""
        assert self.t.stop(time.monotonic() + 5.0)
        handler: Callable[[], None] = self.t._handlers[self.kick_fd]  # the worker's own entry point
        return handler

    def in_thread(self, handler: Callable[[], None], n: int) -> float:
        """Mean microseconds per request in the kick handler alone (the worker stopped), in
        this thread's CPU time: a busy host's other work is not counted."""
        spent = 0.0
        clock = time.thread_time
        for _ in range(n):
            if self.post():
                os.eventfd_write(self.kick_fd, 1)
            start = clock()
            handler()
            spent += clock() - start
            os.eventfd_read(self.irq_fd)
            self.collect()
        return spent / n * 1e6

    def bytecodes(self, handler: Callable[[], None], n: int) -> tuple[float, float]:
        """Python bytecodes and Python function calls per request in the kick handler: counts
        that no busy host disturbs, and what an emulated CPU pays for most."""
        ops = calls = 0
        for _ in range(n):
            if self.post():
                os.eventfd_write(self.kick_fd, 1)
            counted = count_bytecodes(handler)
            ops, calls = ops + counted[0], calls + counted[1]
            os.eventfd_read(self.irq_fd)
            self.collect()
        return ops / n, calls / n

    def profile(self, handler: Callable[[], None], n: int, top: int = 18) -> None:
        prof = cProfile.Profile()
        for _ in range(n):
            if self.post():
                os.eventfd_write(self.kick_fd, 1)
            prof.runcall(handler)
            os.eventfd_read(self.irq_fd)
            self.collect()
        stats = pstats.Stats(prof)
        calls = stats.total_calls  # type: ignore[attr-defined]  # pstats keeps it as an attribute
        print(f"  profile: {calls / n:.1f} calls per request (C functions too); the top by own time:")
        stats.sort_stats("tottime").print_stats(top)

    def close(self) -> None:
        self.vm.close()


def main(requests: int = REQUESTS, runs: int = RUNS, profile: bool = False) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        image = os.path.join(tmp, "disk.img")
        with open(image, "wb") as f:
            f.write(os.urandom(DISK_BLOCKS * BLOCK))
        e2e, e2e_cpu, inline = [], [], []
        for _ in range(runs):
            bench = BlkBench(image)
            try:
                bench.end_to_end(200)  # warm the page cache and the caches on the way
                wall, cpu = bench.end_to_end(requests)
                e2e.append(wall)
                e2e_cpu.append(cpu)
                handler = bench.stop_worker()
                inline.append(bench.in_thread(handler, requests))
            finally:
                bench.close()
        result = {"end_to_end_us": median(e2e), "end_to_end_cpu_us": median(e2e_cpu), "in_thread_us": median(inline)}
        print(f"virtio-blk, one {BLOCK}-byte read at a time, {requests} requests, median of {runs} runs:")
        for label, key, values in (("end to end", "end_to_end_us", e2e), ("  its CPU", "end_to_end_cpu_us", e2e_cpu),
                                   ("in thread", "in_thread_us", inline)):
            print(f"  {label:10} {result[key]:8.2f} us/request   ({', '.join(f'{x:.2f}' for x in values)})")
        bench = BlkBench(image)
        try:
            handler = bench.stop_worker()
            bench.in_thread(handler, 10)  # warm
            result["bytecodes"], result["python_calls"] = bench.bytecodes(handler, 100)
            print(f"  in thread  {result['bytecodes']:.0f} Python bytecodes in {result['python_calls']:.0f} "
                  "Python calls per request")
            if profile:
                bench.profile(handler, requests)
        finally:
            bench.close()
        result.update(interrupt_status_exit(image))
    return result


def count_bytecodes(fn: Callable[[], None]) -> tuple[int, int]:
    """Python bytecodes and Python function calls `fn()` runs (sys.settrace's events)."""
    counts = [0, 0]

    def trace(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "call":
            frame.f_trace_opcodes = True
            counts[1] += 1
        elif event == "opcode":
            counts[0] += 1
        return trace

    sys.settrace(trace)
    try:
        fn()
    finally:
        sys.settrace(None)
    return counts[0], counts[1]


def interrupt_status_exit(image: str, exits: int = 20_000) -> dict[str, float]:
    """The guest's InterruptStatus load after each interrupt, an MMIO exit on its vCPU thread,
    through the real vCPU loop on a fake vCPU fd: as a hot register (what pyvmm does) and through
    the bus (decode, lookup, the transport's read, completion), in bytecodes and CPU time."""
    vm = FakeVm()
    try:
        transport = vm.attach(VirtioBlk(image))
        addr = transport.base + reg.INTERRUPT_STATUS
        vm.mmio.add_hot_register(addr, transport.interrupt_status)  # as Vm.add_virtio does
        fd = FakeVcpuFd()
        vcpu = Vcpu(0, cast(VcpuFd, fd), 0, MachineExits(Dispatcher(), vm.mmio, UnhandledMmio("stop"), cast(Any, None)))
        fd.mmio(addr, 4)
        hot = dict(vm.mmio.hot_reads)

        def loop(n: int) -> None:
            fd.arm(n)
            vcpu.leave_guest()
            vcpu._loop()

        out: dict[str, float] = {}
        for label, hot_reads in (("hot", hot), ("bus", {})):
            vm.mmio.hot_reads.clear()
            vm.mmio.hot_reads.update(hot_reads)
            out[f"isr_{label}_bytecodes"] = (count_bytecodes(lambda: loop(101))[0] - count_bytecodes(lambda: loop(1))[0]) / 100
            times = []
            for _ in range(RUNS):
                started = time.thread_time_ns()
                loop(exits)
                times.append((time.thread_time_ns() - started) / exits)
            out[f"isr_{label}_ns"] = median(times)
        print(f"InterruptStatus load (an MMIO exit per interrupt) through the vCPU loop: as a hot register "
              f"{out['isr_hot_bytecodes']:.0f} bytecodes, {out['isr_hot_ns']:.0f} ns; through the bus "
              f"{out['isr_bus_bytecodes']:.0f} bytecodes, {out['isr_bus_ns']:.0f} ns")
        return out
    finally:
        vm.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="virtio-blk's per-request cost on the host side, without KVM")
    parser.add_argument("--requests", type=int, default=REQUESTS)
    parser.add_argument("--runs", type=int, default=RUNS)
    parser.add_argument("--profile", action="store_true", help="add a cProfile of the in-thread path")
    args = parser.parse_args()
    main(args.requests, args.runs, args.profile)

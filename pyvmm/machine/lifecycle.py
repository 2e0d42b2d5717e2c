"""A machine's life cycle, in one place: build -> run -> reset -> stop -> close.

  build   Vm() creates, in order: /dev/kvm, the VM fd, guest RAM, the vGIC, the vCPUs, the vGIC's
          final init, the UART; then the user adds devices, services and images. Everything made
          is registered for close(); a failure part-way closes what was made and re-raises.
  run     the SMCCC filter (before any KVM_RUN: KVM refuses it later), device workers, then one
          thread per vCPU. The run ends when the guest powers off, crashes, halts or fails, when
          stop() is called, or at the time limit.
  reset   a guest's SYSTEM_RESET, within the same run, strictly in this order:
            1. every vCPU thread ends (nothing runs guest code or answers a call);
            2. every device is quiesced: its worker has ended, no I/O is in flight, nothing will
               write into guest RAM (a disk read or a received frame must not land in the new
               guest's memory);
            3. the vGIC goes back to its state after initialisation (nothing enabled, pending or
               active), firmware services (PSCI, SDEI) to theirs;
            4. every device is reset (virtio: as if the driver wrote status 0; the UART), then
               every interrupt line is lowered;
            5. the images are loaded into RAM again;
            6. every vCPU is re-initialised (vCPU 0 at the boot entry, the others off);
            7. devices resume, vCPU threads start.
          With KVM's in-kernel PSCI (no SMCCC filter, or Vm(psci=False)) power is KVM's: its
          SYSTEM_OFF and SYSTEM_RESET come as system events, secondaries wait inside KVM_RUN, and
          a guest whose every vCPU is off runs until the time limit, as under kvmtool.
  stop    every vCPU thread is asked to end (kicked out of KVM_RUN) and joined within a bound.
  close   device workers end; then everything is freed in the reverse order of its making. A
          thread that does not end in time is reported, and nothing it may still touch (its
          kvm_run mapping, guest RAM, fds whose numbers a new VM could reuse) is ever freed.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import TYPE_CHECKING, Protocol

from pyvmm.errors import VmmError
from pyvmm.machine.images import Image
from pyvmm.machine.irq_lines import InterruptLines
from pyvmm.machine.memory import GuestMemory
from pyvmm.machine.power import Entry

if TYPE_CHECKING:
    from pyvmm.smccc.context import ServiceVcpu
    from pyvmm.smccc.dispatcher import Dispatcher

log = logging.getLogger("pyvmm")

STOP_GRACE = 5.0  # seconds a thread gets to end once asked

# What threads that would not stop may still touch: never freed (see close()).
_kept_alive: list[ExitStack] = []


def threads_left_running() -> bool:
    """Whether a closed machine left a thread running (its resources are kept alive)."""
    return bool(_kept_alive)


def _message(e: BaseException) -> str:
    return str(e) if isinstance(e, VmmError) else f"internal error: {type(e).__name__}: {e}"


class RunResult:
    """Why a run ended. `reason`: poweroff, reset, crash, suspend, halted, timeout, stopped or error."""

    __slots__ = ("reason", "message", "vcpu", "data", "elapsed", "stuck")

    def __init__(self, reason: str, message: str = "", vcpu: int | None = None, data: tuple[int, ...] = ()) -> None:
        self.reason, self.message, self.vcpu, self.data = reason, message, vcpu, data
        self.elapsed = 0.0
        self.stuck: list[str] = []  # the threads that would not stop when the run ended, and where

    @property
    def ok(self) -> bool:
        return self.reason == "poweroff"

    def __repr__(self) -> str:
        return f"RunResult({self})"

    def __str__(self) -> str:
        who = f" (vcpu{self.vcpu})" if self.vcpu is not None else ""
        message = "; ".join([m for m in (self.message, *self.stuck) if m])
        return f"{self.reason}{who}{': ' + message if message else ''}"


class MachineDevice(Protocol):
    """A device's part in the life cycle (the UART, each virtio transport)."""

    name: str

    def start(self) -> None:
        """The run begins (start workers)."""

    def release_waiters(self) -> None:
        """The vCPUs are about to be stopped: none may go on waiting for this device."""

    def quiesce(self, deadline: float) -> bool:
        """Until resume(): nothing in flight, nothing touches guest RAM. False: not stopped by
        `deadline` (time.monotonic())."""

    def reset(self) -> None:
        """Back to the power-on state (quiesced)."""

    def resume(self) -> None:
        """After a reset: work again."""

    def stop(self, deadline: float) -> bool:
        """The run is over: every thread of the device has ended (False: one had not by `deadline`)."""


class MachineVcpu(Protocol):
    """A vCPU's part in the life cycle (pyvmm.machine.vcpu.Vcpu is one)."""

    index: int
    thread: threading.Thread | None

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def join(self, deadline: float) -> bool: ...

    def reset(self, entry: Entry | None) -> None: ...

    def leave_guest(self) -> None: ...


class IrqChip(Protocol):
    def reset(self) -> None: ...


def where(thread: threading.Thread) -> str:
    """The function and line a thread is running, outside the standard library (to report one
    that will not stop: the user's handler, not the Event.wait it sits in)."""
    import sysconfig  # only here: a failure's report, kept off start-up

    frame = sys._current_frames().get(thread.ident or -1)
    stdlib = sysconfig.get_paths()["stdlib"]
    while frame is not None and frame.f_back is not None and frame.f_code.co_filename.startswith(stdlib):
        frame = frame.f_back
    if frame is None:
        return "no Python frame"
    code = frame.f_code
    return f"{code.co_name}() at {os.path.basename(code.co_filename)}:{frame.f_lineno}"


class Lifecycle:
    def __init__(self, memory: GuestMemory, lines: InterruptLines, smccc: Dispatcher,
                 install_filter: Callable[[], None], *, vcpus: Sequence[MachineVcpu] = (), gic: IrqChip | None = None,
                 reboot: bool = True) -> None:
        """`vcpus`: the machine's, a sequence filled as they are made (each vCPU's exits come back
        here, so the sequence exists first); `reboot`: False ends a run at the guest's reset."""
        self._memory, self._lines, self._smccc = memory, lines, smccc
        self._install_filter = install_filter
        self.vcpus = vcpus
        self.gic = gic
        self.devices: list[MachineDevice] = []
        self.images: list[Image] = []
        self.boot: Entry | None = None  # where vCPU 0 starts
        self.on_run_end: list[Callable[[], None]] = []  # e.g. flush the console
        self.resets = 0
        self.reboot = reboot  # False: a guest's reset ends the run (QEMU's -no-reboot)
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._result: RunResult | None = None
        self._reset_pending: str | None = None
        self.ran = False
        self._closed = False
        self._stuck: set[MachineVcpu] = set()  # vCPU threads that would not stop (reported once)

    @property
    def result(self) -> RunResult | None:
        """Why the run ended; None until it has."""
        return self._result

    def add_device(self, device: MachineDevice) -> None:
        self.devices.append(device)

    def add_image(self, image: Image) -> None:
        self.images.append(image)

    # --- run -------------------------------------------------------------------------------
    def run(self, timeout: float | None = None) -> RunResult:
        """Run until the guest powers off or fails, stop() is called, or `timeout` seconds pass
        (resets included); every vCPU thread has ended when this returns."""
        if self.ran:
            raise VmmError("this VM has already run; build a new Vm to run again")
        self._install_filter()
        self.ran = True
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        try:
            if self._result is None:  # a stop() before the run (a signal during set-up) starts nothing
                for d in self.devices:
                    d.start()
                for v in self.vcpus:
                    v.start()
            while True:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                if not self._done.wait(left):
                    self.finish(RunResult("timeout", f"the guest was still running after {timeout:g} s"))
                    break
                with self._lock:
                    if self._result is not None:
                        break
                    log.info("guest reset: %s", self._reset_pending)
                    self._reset_pending = None
                    self._done.clear()
                self._reset()
        except KeyboardInterrupt:
            self.finish(RunResult("stopped", "interrupted"))
        except Exception as e:  # starting a thread, or a reset step: the run ends with its message
            self.finish(RunResult("error", _message(e)))
        finally:
            stuck = self._stop_vcpus()
            for fn in self.on_run_end:
                fn()
        result = self._result
        assert result is not None
        result.stuck = stuck
        result.elapsed = time.monotonic() - started
        return result

    def _reset(self) -> None:
        """SYSTEM_RESET: the steps of the module's docstring, in order."""
        stuck = self._stop_vcpus()
        with self._lock:  # every vCPU has stopped: a second SYSTEM_RESET of the old boot is this one
            self._reset_pending = None
            if self._result is None:
                self._done.clear()
        deadline = time.monotonic() + STOP_GRACE
        stuck += [f"{d.name} did not quiesce within {STOP_GRACE:g} s" for d in self.devices
                  if not d.quiesce(deadline)]
        if stuck:
            self.finish(RunResult("error", "the guest's reset failed: " + "; ".join(stuck)))
            return
        try:
            if self.gic is not None:
                self.gic.reset()
            self._smccc.reset()
            for d in self.devices:
                d.reset()
            self._lines.lower_all()  # after the devices: none of them drives a line any more
            for image in self.images:
                image.load(self._memory)
            for v in self.vcpus:
                v.reset(self.boot)
        except Exception as e:
            self.finish(RunResult("error", f"the guest's reset failed: {_message(e)}"))
            return
        self.resets += 1
        for d in self.devices:
            d.resume()
        for v in self.vcpus:
            v.start()

    def _stop_vcpus(self) -> list[str]:
        """Ask every vCPU thread to end and wait (once) for each; the ones newly found stuck."""
        for d in self.devices:  # a vCPU in a device's register write must not wait on it
            d.release_waiters()
        for v in self.vcpus:
            v.stop()
        deadline = time.monotonic() + STOP_GRACE
        stuck = []
        for v in self.vcpus:
            if not v.join(time.monotonic() if v in self._stuck else deadline) and v.thread is not None:
                if v not in self._stuck:
                    self._stuck.add(v)
                    stuck.append(f"vcpu{v.index} did not stop within {STOP_GRACE:g} s: it is in {where(v.thread)}")
            else:
                self._stuck.discard(v)
        return stuck

    # --- what ends a run (any thread) --------------------------------------------------------
    def finish(self, result: RunResult) -> None:
        with self._lock:
            if self._result is None:
                self._result = result
        self._done.set()

    def stop(self, message: str = "stopped by request") -> None:
        self.finish(RunResult("stopped", message))

    def request_reset(self, vcpu: ServiceVcpu, message: str) -> None:
        """From a vCPU thread: restart the guest from its boot state (PSCI SYSTEM_RESET)."""
        vcpu.leave_guest()
        if not self.reboot:
            self.finish(RunResult("reset", message, vcpu.index))
            return
        with self._lock:
            self._reset_pending = message
        self._done.set()

    def power_off_system(self, vcpu: ServiceVcpu, message: str) -> None:
        """From a vCPU thread: the guest is off (PSCI SYSTEM_OFF); the run ends with status 0."""
        vcpu.leave_guest()
        self.finish(RunResult("poweroff", message, vcpu.index))

    # --- close -----------------------------------------------------------------------------
    def close(self, resources: ExitStack) -> None:
        """End every thread, then free `resources` (everything the machine made) — unless a
        thread would not end: then report it and keep everything it may touch alive."""
        if self._closed:
            return
        self._closed = True
        new = self._stop_vcpus()
        deadline = time.monotonic() + STOP_GRACE
        new += [f"{d.name}'s worker did not stop within {STOP_GRACE:g} s" for d in self.devices
                if not d.stop(deadline)]
        for s in new:  # those found stuck during the run were reported in its result
            log.warning("%s; its VM's memory and file descriptors are kept", s)
        if new or self._stuck:
            _kept_alive.append(resources.pop_all())
            return
        resources.close()

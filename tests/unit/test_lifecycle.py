"""The life cycle's ordering (pyvmm/machine/lifecycle.py), and the virtio transport's part in it: a
reset quiesces every device before the vGIC is reset and the images are loaded again; a
register access never waits behind device I/O; a worker survives what it does not expect; a
worker that will not stop is reported, not waited for forever. Real transports, threads and
RAM; no KVM."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import cast

import pytest

from pyvmm.devices.virtio import mmio_registers as reg
from pyvmm.devices.virtio.device import VirtioDevice
from pyvmm.devices.virtio.rings.queue import Virtqueue
from pyvmm.devices.virtio.transport import VirtioMmio
from pyvmm.machine.images import BlobImage
from pyvmm.machine.irq_lines import InterruptLines
from pyvmm.machine.lifecycle import Lifecycle, RunResult
from pyvmm.machine.memory import GuestMemory
from pyvmm.machine.power import Entry
from pyvmm.smccc.dispatcher import Dispatcher
from pyvmm.smccc.service import Service
from tests.unit.fakes import FakeVcpu, FakeVmFd
from tests.unit.virtio_driver import RAM, Driver, FakeVm


class Recorder:
    def __init__(self) -> None:
        self.log: list[str] = []


class Part:
    """The vGIC, a device or a vCPU, recording what the life cycle asks of it."""

    def __init__(self, name: str, rec: Recorder) -> None:
        self.name, self.rec = name, rec

    def _note(self, what: str) -> None:
        self.rec.log.append(f"{what} {self.name}")

    def reset(self) -> None:
        self._note("reset")


class DevicePart(Part):
    def __init__(self, name: str, rec: Recorder, quiesces: bool = True) -> None:
        super().__init__(name, rec)
        self.quiesces = quiesces

    def start(self) -> None:
        self._note("start")

    def release_waiters(self) -> None:
        pass

    def quiesce(self, deadline: float) -> bool:
        self._note("quiesce")
        return self.quiesces

    def resume(self) -> None:
        self._note("resume")

    def stop(self, deadline: float) -> bool:
        self._note("stop")
        return True

    def close(self) -> None:
        pass


class VcpuPart(Part):
    def __init__(self, name: str, rec: Recorder, index: int) -> None:
        super().__init__(name, rec)
        self.index = index
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self._note("start")

    def stop(self) -> None:
        self._note("stop")

    def join(self, deadline: float) -> bool:
        return True

    def reset(self, entry: Entry | None = None) -> None:
        self._note("reset")

    def leave_guest(self) -> None:
        pass


class RecordingService(Service):
    name = "firmware"

    def __init__(self, rec: Recorder) -> None:
        self.rec = rec

    def reset(self) -> None:
        self.rec.log.append("reset firmware")


class RecordingRam(GuestMemory):
    def __init__(self, rec: Recorder) -> None:
        super().__init__()
        self.rec = rec

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self.rec.log.append("load image")
        super().write(gpa, data)


class RecordingLines(InterruptLines):
    def __init__(self, rec: Recorder) -> None:
        super().__init__(FakeVmFd())
        self.rec = rec

    def lower_all(self) -> None:
        self.rec.log.append("lower lines")
        super().lower_all()


def test_a_reset_quiesces_devices_then_resets_the_vgic_then_reloads() -> None:
    rec = Recorder()
    ram = RecordingRam(rec)
    ram.add(RAM, 1 << 20)
    smccc = Dispatcher()
    smccc.add_service(RecordingService(rec))
    life = Lifecycle(ram, RecordingLines(rec), smccc, lambda: None)
    life.vcpus = [VcpuPart("vcpu0", rec, 0), VcpuPart("vcpu1", rec, 1)]
    life.gic = Part("vgic", rec)
    life.devices = [DevicePart("blk", rec), DevicePart("net", rec)]
    life.images = [BlobImage(RAM, b"kernel")]
    life.boot = Entry(RAM, 0)
    life.request_reset(FakeVcpu(), "SYSTEM_RESET")
    rec.log.clear()
    life._reset()
    ram.close()
    assert rec.log == [
        "stop vcpu0", "stop vcpu1",  # 1. nothing runs guest code
        "quiesce blk", "quiesce net",  # 2. nothing writes guest RAM
        "reset vgic", "reset firmware",  # 3.
        "reset blk", "reset net", "lower lines",  # 4.
        "load image",  # 5.
        "reset vcpu0", "reset vcpu1",  # 6.
        "resume blk", "resume net", "start vcpu0", "start vcpu1"]  # 7.
    assert life.resets == 1


def test_a_device_that_will_not_quiesce_ends_the_run_instead_of_resetting() -> None:
    rec = Recorder()
    ram = GuestMemory()
    life = Lifecycle(ram, InterruptLines(FakeVmFd()), Dispatcher(), lambda: None)
    life.devices = [DevicePart("blk", rec, quiesces=False)]
    life._reset()
    assert not rec.log[-1].startswith("load") and life.resets == 0
    result = life._result
    assert isinstance(result, RunResult) and result.reason == "error"
    assert result.message == "the guest's reset failed: blk did not quiesce within 5 s"


class Blocking(VirtioDevice):
    """A device whose requests take as long as the test says (a slow disk's fsync)."""

    device_id = 4
    name = "slow"
    queue_sizes = (8,)

    def __init__(self) -> None:
        super().__init__()
        self.busy = threading.Event()
        self.finish = threading.Event()

    def notify(self, queue: Virtqueue) -> None:
        self.busy.set()
        self.finish.wait(10)


@pytest.fixture
def vm() -> Iterator[FakeVm]:
    fake = FakeVm()
    yield fake
    for d in fake.transports:
        assert isinstance(d.device, Blocking)
        d.device.finish.set()
    fake.close()


def in_thread(fn: Callable[..., object], *args: object) -> threading.Thread:
    t = threading.Thread(target=fn, args=args, daemon=True)
    t.start()
    return t


def in_a_request(vm: FakeVm) -> tuple[Blocking, VirtioMmio, Driver]:
    """A Blocking device whose worker is inside a request (until dev.finish is set)."""
    dev = Blocking()
    t = vm.attach(dev)
    d = Driver(t, vm.memory)
    d.init()
    d.queues[0].add([b"x"], [])
    d.queues[0].kick()
    assert dev.busy.wait(5)
    return dev, t, d


def test_register_accesses_do_not_wait_behind_device_io(vm: FakeVm) -> None:
    dev, _, d = in_a_request(vm)
    # what a vCPU does meanwhile: select a queue, write the features select, read status and ISR
    def registers() -> None:
        d.write(reg.QUEUE_SEL, 0)
        d.write(reg.DEVICE_FEATURES_SEL, 1)
        d.read(reg.STATUS)
        d.read(reg.INTERRUPT_STATUS)

    t = in_thread(registers)
    t.join(2)
    assert not t.is_alive(), "a register access waited for the device's I/O"
    # a reset does not wait either: it is done once the request is (the rings may not go while it
    # uses them), and until then status reads non-zero, as the driver must wait for 0 (§2.4.1)
    reset = in_thread(d.write, reg.STATUS, 0)
    reset.join(2)
    assert not reset.is_alive() and d.read(reg.STATUS) != 0
    dev.finish.set()
    deadline = time.monotonic() + 5
    while d.read(reg.STATUS) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert d.read(reg.STATUS) == 0 and not any(q.ready for q in d.t.queues)


def test_a_driver_writing_on_before_its_reset_completed_waits_only_until_the_machine_stops(vm: FakeVm) -> None:
    dev, t, d = in_a_request(vm)
    d.write(reg.STATUS, 0)
    again = in_thread(d.write, reg.STATUS, reg.ACKNOWLEDGE)  # does not wait for status 0
    again.join(0.3)
    assert again.is_alive()  # its write must come after the reset: it waits for the request
    t.release_waiters()  # the machine stops its vCPUs
    again.join(2)
    assert not again.is_alive()
    dev.finish.set()


def test_a_driver_waiting_for_its_reset_is_woken_when_the_request_ends(vm: FakeVm,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker wakes a vCPU waiting for it (it skips the wake-up only when none waits): with
    the waits' 0.1 s timeout taken away, nothing else would."""
    dev, t, d = in_a_request(vm)
    real_wait = t._state.wait
    monkeypatch.setattr(t._state, "wait", lambda timeout=None: real_wait())
    d.write(reg.STATUS, 0)
    again = in_thread(d.write, reg.STATUS, reg.ACKNOWLEDGE)
    again.join(0.3)
    assert again.is_alive()  # waiting for the request, as above
    dev.finish.set()
    again.join(5)
    assert not again.is_alive() and d.read(reg.STATUS) == reg.ACKNOWLEDGE


def test_a_worker_that_will_not_stop_is_reported_in_bounded_time(vm: FakeVm) -> None:
    dev, t, d = in_a_request(vm)
    started = time.monotonic()
    assert not t.stop(time.monotonic() + 0.3)  # stuck in its backend: not waited for
    assert time.monotonic() - started < 2
    dev.finish.set()
    assert t.stop(time.monotonic() + 5)


def test_the_worker_survives_an_unexpected_exception(vm: FakeVm, monkeypatch: pytest.MonkeyPatch) -> None:
    dev = Blocking()
    dev.finish.set()
    t = vm.attach(dev)
    d = Driver(t, vm.memory)
    d.init()
    hooks: list[object] = []
    monkeypatch.setattr(threading, "excepthook", hooks.append)
    kick = t.kick_fd(0)
    real_handler = t._handlers[kick]

    def failing_handler() -> None:  # outside device code, where nothing catches it but the loop
        t._handlers[kick] = real_handler
        raise RuntimeError("injected")

    monkeypatch.setitem(t._handlers, kick, failing_handler)
    d.queues[0].add([b"x"], [])
    d.queues[0].kick()
    d.wait_broken()
    assert t.broken == "internal error: RuntimeError: injected"
    assert t._thread is not None and t._thread.is_alive() and hooks == []
    d.write(reg.STATUS, 0)  # the driver resets the device, which serves again
    dev.busy.clear()
    d.init()
    d.queues[0].add([b"y"], [])
    d.queues[0].kick()
    assert dev.busy.wait(5)


@pytest.mark.parametrize("reboot", [True, False])
def test_kvms_own_psci_system_events_power_off_or_reset_the_machine(reboot: bool) -> None:
    """With KVM's in-kernel PSCI (a host without the SMCCC filter) SYSTEM_OFF and SYSTEM_RESET
    come as KVM_EXIT_SYSTEM_EVENT: a power-off, and a reset within the run as for pyvmm's own."""
    from kvm_bindings.constants import SystemEvent
    from pyvmm.devices.bus import MmioBus
    from pyvmm.kvm.exits import SystemEventExit
    from pyvmm.machine.exit_dispatch import MachineExits, UnhandledMmio
    from pyvmm.machine.vcpu import Vcpu

    def machine() -> tuple[Lifecycle, MachineExits]:
        life = Lifecycle(GuestMemory(), InterruptLines(FakeVmFd()), Dispatcher(), lambda: None)
        life.reboot = reboot
        return life, MachineExits(life._smccc, MmioBus(), UnhandledMmio("ignore"), life)

    life, exits = machine()
    vcpu = cast(Vcpu, FakeVcpu())
    assert exits.system_event(vcpu, SystemEventExit(SystemEvent.RESET, ())) is False  # this thread ends
    if reboot:
        assert life._reset_pending == "guest system event reset (KVM's PSCI)" and life._result is None
    else:
        assert life._result is not None and life._result.reason == "reset"
    life, exits = machine()
    exits.system_event(vcpu, SystemEventExit(SystemEvent.SHUTDOWN, ()))
    assert life._result is not None and life._result.reason == "poweroff" and life._result.ok
    life, exits = machine()
    exits.system_event(vcpu, SystemEventExit(SystemEvent.CRASH, ()))
    assert life._result is not None and life._result.reason == "crash"

"""vhost-net's set-up on a stand-in /dev/vhost-net (the kernel's half is tests/kvm's): what pyvmm
tells the kernel at DRIVER_OK, at a reset, and where no vhost-net can be had."""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import cast

import pytest

from pyvmm.devices.virtio import mmio_registers as reg
from pyvmm.devices.virtio import net as virtio_net
from pyvmm.devices.virtio.device import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1
from pyvmm.devices.virtio.net import VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VirtioNet, parse_network
from pyvmm.devices.virtio.vhost_net import VIRTIO_NET_F_MRG_RXBUF, VhostNet, open_nic
from pyvmm.errors import VmmError
from pyvmm.kvm.fds import VhostFd
from pyvmm.machine.host import HOST_NOTES
from tests.unit.virtio_driver import RAM, RAM_SIZE, Driver, FakeVm

VHOST_NET_F_VIRTIO_NET_HDR = 1 << 27
VHOST_F_LOG_ALL = 1 << 26
KERNEL_OFFERS = (VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX | VIRTIO_F_INDIRECT_DESC | VIRTIO_NET_F_MRG_RXBUF
                 | VHOST_NET_F_VIRTIO_NET_HDR | VHOST_F_LOG_ALL)


class FakeVhost:
    """Records the requests VhostFd would make, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []
        self.closed = False

    def get_features(self) -> int:
        return KERNEL_OFFERS

    def __getattr__(self, name: str) -> object:
        def record(*args: object) -> int:
            self.calls.append((name, *args))
            return 7  # get_vring_base's answer
        return record

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def taps(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The fds the NICs get for their taps (each one end of a socket pair), in order."""
    opened: list[int] = []

    def open_tap(name: str, header: int) -> int:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        ours.close()
        opened.append(theirs.detach())
        return opened[-1]
    monkeypatch.setattr(virtio_net, "open_tap", open_tap)
    return opened


def test_driver_ok_hands_the_rings_and_the_tap_to_the_kernel(taps: list[int]) -> None:
    vm = FakeVm()
    vhost = FakeVhost()
    try:
        dev = VhostNet(parse_network("mode=tap,tapif=fake0"), cast(VhostFd, vhost))
        t = vm.attach(dev)
        d = Driver(t, vm.memory)
        offered = d.features()
        # the guest is offered the kernel's ring features and mergeable buffers, and pyvmm's MAC
        # and link status; nothing of vhost's own (its header, dirty logging)
        assert offered == (VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX | VIRTIO_F_INDIRECT_DESC | VIRTIO_NET_F_MRG_RXBUF
                           | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS)
        d.init()
        (region,) = vm.memory.regions  # anonymous RAM: the kernel reaches it through this process
        host = vm.memory.host_address
        rings = []
        for q in d.queues:
            i = q.index
            rings += [("set_vring_num", i, 256), ("set_vring_addr", i, host(q.desc, 1), host(q.used, 1), host(q.avail, 1)),
                      ("set_vring_base", i, 0), ("set_vring_call", i, t.irq.fd), ("set_vring_kick", i, t.kick_fd(i)),
                      ("net_set_backend", i, taps[0])]
        assert vhost.calls == [("set_features", offered & KERNEL_OFFERS),
                               ("set_mem_table", [(RAM, RAM_SIZE, region.host_addr)]), *rings]
        assert not set(t._kick_fds) & set(t._handlers)  # no pyvmm thread serves the rings
        vhost.calls.clear()
        d.write(reg.STATUS, 0)  # a device reset: each ring leaves the tap, then stops
        assert vhost.calls == [("net_set_backend", 0, -1), ("get_vring_base", 0),
                               ("net_set_backend", 1, -1), ("get_vring_base", 1)]
    finally:
        vm.close()
    assert vhost.closed


def test_a_kernel_refusal_ends_the_run_in_one_line(taps: list[int]) -> None:
    class Refusing(FakeVhost):
        def set_features(self, features: int) -> None:
            raise VmmError("VHOST_SET_FEATURES: Operation not supported")
    vm = FakeVm()
    vhost = Refusing()
    ended: list[str] = []
    try:
        d = Driver(vm.attach(VhostNet(parse_network("mode=tap,tapif=fake0"), cast(VhostFd, vhost)), ended.append),
                   vm.memory)
        d.init()
    finally:
        vm.close()
    assert ended == ["VHOST_SET_FEATURES: Operation not supported"]


def test_without_vhost_net_pyvmm_moves_the_frames_and_says_so(taps: list[int], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=HOST_NOTES)  # whatever an earlier test left it at
    nic = open_nic(parse_network("mode=tap,tapif=fake0"), vhost_path="/nonexistent/vhost-net")
    try:
        assert type(nic) is VirtioNet
    finally:
        nic.close()
    assert [r.getMessage() for r in caplog.records] == [
        "virtio-net: no vhost-net (/nonexistent/vhost-net: No such file or directory): pyvmm moves the frames "
        "of tap fake0"]
    caplog.clear()
    nic = open_nic(parse_network("mode=tap,tapif=fake0,vhost=0"), vhost_path="/nonexistent/vhost-net")
    nic.close()
    assert type(nic) is VirtioNet and not caplog.records  # asked for: nothing to say


@pytest.mark.parametrize("spec, vhost", [("mode=tap,tapif=t0", True), ("mode=tap,tapif=t0,vhost=1", True),
                                         ("mode=tap,tapif=t0,vhost=0", False)])
def test_vhost_option(spec: str, vhost: bool) -> None:
    assert parse_network(spec).vhost is vhost


def test_a_bad_vhost_option_is_one_line() -> None:
    with pytest.raises(VmmError, match="vhost= is 0 or 1"):
        parse_network("mode=tap,tapif=t0,vhost=yes")


def test_check_says_where_frames_move(tmp_path: Path) -> None:
    from pyvmm.cli.cmd_check import vhost_net_line

    missing = tmp_path / "vhost-net"
    assert vhost_net_line(str(missing)) == f"tap NICs        pyvmm moves the frames ({missing}: No such file or directory; load vhost_net)"


def test_a_broken_device_hands_no_ring_to_the_kernel(taps: list[int]) -> None:
    """A queue readied with a ring outside RAM breaks the device; the DRIVER_OK after it must not
    start the kernel on the device's other rings (it serves nothing until reset)."""
    vm = FakeVm()
    vhost = FakeVhost()
    try:
        d = Driver(vm.attach(VhostNet(parse_network("mode=tap,tapif=fake0"), cast(VhostFd, vhost))), vm.memory)
        d.write(reg.STATUS, reg.ACKNOWLEDGE | reg.DRIVER)
        d.write(reg.DRIVER_FEATURES_SEL, 1)
        d.write(reg.DRIVER_FEATURES, 1)
        d.write(reg.STATUS, reg.ACKNOWLEDGE | reg.DRIVER | reg.FEATURES_OK)
        d.write(reg.QUEUE_DESC_LOW, 0x1000)  # below RAM
        d.write(reg.QUEUE_READY, 1)
        d.write(reg.STATUS, reg.ACKNOWLEDGE | reg.DRIVER | reg.FEATURES_OK | reg.DRIVER_OK)
        assert d.read(reg.STATUS) & reg.DEVICE_NEEDS_RESET
        assert vhost.calls == []
    finally:
        vm.close()


@pytest.mark.parametrize("refusal, why", [
    ("owner", "VHOST_SET_OWNER failed: Device or resource busy"),
    ("version", "it offers no VIRTIO_F_VERSION_1"),
])
def test_a_vhost_net_that_cannot_serve_falls_back(taps: list[int], caplog: pytest.LogCaptureFixture,
                                                  monkeypatch: pytest.MonkeyPatch, refusal: str, why: str) -> None:
    from pyvmm.devices.virtio import vhost_net

    closed: list[bool] = []

    class Refusing(FakeVhost):
        def __init__(self, path: str) -> None:
            super().__init__()
            if refusal == "owner":
                raise VmmError("VHOST_SET_OWNER failed: Device or resource busy")

        def get_features(self) -> int:
            return KERNEL_OFFERS & ~VIRTIO_F_VERSION_1

        def close(self) -> None:
            closed.append(True)
    monkeypatch.setattr(vhost_net, "VhostFd", Refusing)
    caplog.set_level(logging.WARNING, logger=HOST_NOTES)
    nic = open_nic(parse_network("mode=tap,tapif=fake0"))
    nic.close()
    assert type(nic) is VirtioNet
    assert closed == ([] if refusal == "owner" else [True])  # what opened is closed again
    assert [r.getMessage() for r in caplog.records] == [
        f"virtio-net: no vhost-net (/dev/vhost-net: {why}): pyvmm moves the frames of tap fake0"]

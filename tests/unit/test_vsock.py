"""virtio-vsock's set-up on a stand-in /dev/vhost-vsock (the kernel's half is tests/kvm's): the
CID claimed when the device is made, what pyvmm tells the kernel at DRIVER_OK and at a reset, and
the one-line refusals."""

from __future__ import annotations

import argparse
import errno
from pathlib import Path

import pytest

from pyvmm import cli
from pyvmm.devices.virtio import mmio_registers as reg
from pyvmm.devices.virtio import vsock
from pyvmm.devices.virtio.device import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1
from pyvmm.devices.virtio.vsock import VIRTIO_VSOCK_F_SEQPACKET, VhostVsock, guest_cid
from pyvmm.errors import KvmIoctlError, VmmError
from tests.unit.test_cli import run_cli
from tests.unit.test_vhost_net import VHOST_F_LOG_ALL, FakeVhost
from tests.unit.virtio_driver import RAM, RAM_SIZE, Driver, FakeVm

KERNEL_OFFERS = (VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX | VIRTIO_F_INDIRECT_DESC | VIRTIO_VSOCK_F_SEQPACKET
                 | VHOST_F_LOG_ALL)


class FakeVhostVsock(FakeVhost):
    """A /dev/vhost-vsock that records its requests; `taken` CIDs are another VM's."""

    opened: list[FakeVhostVsock] = []
    taken: set[int] = set()

    def __init__(self, path: str) -> None:
        super().__init__()
        FakeVhostVsock.opened.append(self)

    def get_features(self) -> int:
        return KERNEL_OFFERS

    def vsock_set_guest_cid(self, cid: int) -> None:
        if cid in self.taken:
            raise KvmIoctlError("VHOST_VSOCK_SET_GUEST_CID", errno.EADDRINUSE)
        self.calls.append(("vsock_set_guest_cid", cid))


@pytest.fixture
def vhost(monkeypatch: pytest.MonkeyPatch) -> type[FakeVhostVsock]:
    monkeypatch.setattr(vsock, "VhostFd", FakeVhostVsock)
    monkeypatch.setattr(FakeVhostVsock, "opened", [])
    monkeypatch.setattr(FakeVhostVsock, "taken", set())
    return FakeVhostVsock


def test_the_kernel_serves_rx_and_tx_and_the_event_queue_stays(vhost: type[FakeVhostVsock]) -> None:
    vm = FakeVm()
    try:
        t = vm.attach(VhostVsock(42))
        (fake,) = vhost.opened
        assert fake.calls == [("vsock_set_guest_cid", 42)]  # claimed when made, before any guest runs
        d = Driver(t, vm.memory)
        assert d.read(reg.DEVICE_ID) == 19
        assert d.read(reg.CONFIG, 4) | d.read(reg.CONFIG + 4, 4) << 32 == 42  # guest_cid, le64 (§5.10.4)
        offered = d.features()
        # the kernel's ring features and SOCK_SEQPACKET; nothing of vhost's own (dirty logging)
        assert offered == VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX | VIRTIO_F_INDIRECT_DESC | VIRTIO_VSOCK_F_SEQPACKET
        fake.calls.clear()
        d.init()
        assert len(d.queues) == 3
        (region,) = vm.memory.regions
        host = vm.memory.host_address
        rings = []
        for q in d.queues[:2]:
            i = q.index
            rings += [("set_vring_num", i, 128), ("set_vring_addr", i, host(q.desc, 1), host(q.used, 1), host(q.avail, 1)),
                      ("set_vring_base", i, 0), ("set_vring_call", i, t.irq.fd), ("set_vring_kick", i, t.kick_fd(i))]
        # both rings set up before they run: vhost-vsock starts them together
        assert fake.calls == [("set_features", offered), ("set_mem_table", [(RAM, RAM_SIZE, region.host_addr)]),
                              *rings, ("vsock_set_running", True)]
        assert not set(t._kick_fds) & set(t._handlers)  # no pyvmm thread on any ring, the event queue's either
        fake.calls.clear()
        d.write(reg.STATUS, 0)  # a device reset: the kernel lets go of both rings, then they are read back
        assert fake.calls == [("vsock_set_running", False), ("get_vring_base", 0), ("get_vring_base", 1)]
    finally:
        vm.close()
    assert fake.closed  # the CID is given back


def test_a_cid_another_vm_holds_is_refused_in_one_line(vhost: type[FakeVhostVsock]) -> None:
    vhost.taken.add(5)
    with pytest.raises(VmmError) as refused:
        VhostVsock(5)
    assert str(refused.value) == "--vsock: context ID 5 is taken by another VM on this host, or is the host's own"
    assert vhost.opened[0].closed


def test_without_vhost_vsock_the_device_is_refused_in_one_line() -> None:
    with pytest.raises(VmmError) as refused:
        VhostVsock(3, vhost_path="/nonexistent/vhost-vsock")
    assert str(refused.value) == ("--vsock: cannot open /nonexistent/vhost-vsock: No such file or directory "
                                  "(load vhost_vsock)")


@pytest.mark.parametrize("text, cid", [("3", 3), ("0x10", 16), ("4294967294", 0xFFFF_FFFE)])
def test_guest_cids(text: str, cid: int) -> None:
    assert guest_cid(text) == cid


@pytest.mark.parametrize("text", ["0", "1", "2", "4294967295", "4294967296", "-3", "three"])
def test_cids_no_guest_may_have(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        guest_cid(text)


def test_check_says_whether_vsock_works() -> None:
    from pyvmm.cli.cmd_check import vsock_line

    assert vsock_line("/nonexistent/vhost-vsock") == (
        "--vsock         unavailable (/nonexistent/vhost-vsock: No such file or directory; load vhost_vsock)")


def test_a_driver_that_readies_one_ring_gets_a_silent_device(vhost: type[FakeVhostVsock]) -> None:
    """vhost-vsock would fail to start a ring with no addresses (vhost_vsock_start: EFAULT), which
    would end the run: with the tx ring not ready nothing runs, and nothing is there to stop."""
    vm = FakeVm()
    try:
        d = Driver(vm.attach(VhostVsock(7)), vm.memory)
        (fake,) = vhost.opened
        d.init()
        d.write(reg.QUEUE_SEL, 1)
        assert d.read(reg.QUEUE_READY) == 1
        d.write(reg.STATUS, 0)
        fake.calls.clear()
        d.init(ready=(0, 2))
        assert ("vsock_set_running", True) not in fake.calls
        assert ("set_vring_num", 0, 128) in fake.calls and not any(c[1:2] == (1,) for c in fake.calls)
        fake.calls.clear()
        d.write(reg.STATUS, 0)
        assert fake.calls == [("get_vring_base", 0)]
    finally:
        vm.close()


def test_a_cid_no_guest_may_have_is_one_line_on_the_command_line(tmp_path: Path) -> None:
    guest = tmp_path / "guest.bin"
    guest.write_bytes(bytes(16))
    p = run_cli("run", "--vsock", "2", "-f", str(guest))
    assert p.returncode == cli.EXIT_USAGE
    assert p.stderr.splitlines() == [
        "pyvmm run: error: argument --vsock: 2 is not a guest's context ID (3 to 4294967294; 0-2 are the "
        "hypervisor, the loopback and the host) (see pyvmm run --help)"]

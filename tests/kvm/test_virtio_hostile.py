"""A hostile virtio driver on real KVM: an assembled guest feeds pyvmm's virtio-blk a looping
descriptor chain and a buffer outside RAM, kicking through the ioeventfd. The device must ask
for a reset (DEVICE_NEEDS_RESET plus a configuration-change interrupt) and work again after it.
A looping chain on a vhost-net or vhost-vsock ring, which the kernel walks, must stop that ring and
nothing else."""

from __future__ import annotations

import socket
import subprocess
import threading
from pathlib import Path

from pyvmm.devices.virtio.blk import VirtioBlk
from pyvmm.devices.virtio.mmio_registers import INTERRUPT_STATUS, VIRTIO_MMIO_BASE
from pyvmm.devices.virtio.net import parse_network
from pyvmm.devices.virtio.vhost_net import VhostNet, open_nic
from pyvmm.devices.virtio.vsock import VhostVsock
from pyvmm.testing.payloads import MakePayloadVm
from tests.kvm.conftest import NEEDS_FILTER, NEEDS_VHOST_NET, NEEDS_VHOST_VSOCK, guest

pytestmark = NEEDS_FILTER

ACK_DRIVER_FEATURES_OK = 1 | 2 | 8
DRIVER_OK, NEEDS_RESET = 4, 0x40
INT_USED_BUFFER, INT_CONFIG_CHANGE = 1, 2
HOSTILE_TAP = "pyvmmtap3"
VIRTIO_NET_HEADER = 12
HOSTILE_CID, HOSTILE_PORT, HOSTILE_GUEST_PORT = 77, 5003, 1234  # tests/guests/vsock_hostile.S
VSOCK_HEADER, VIRTIO_VSOCK_OP_RESPONSE = 44, 2


def test_malformed_chains_break_the_device_not_the_vmm(payload_vm: MakePayloadVm, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    run = payload_vm(guest("virtio_hostile"))
    vm = run.vm
    blk = VirtioBlk(str(disk))
    vm.add_virtio(blk)
    # the ISR loads below are answered by the vCPU loop itself (devices/bus.py: hot registers)
    assert list(vm.mmio.hot_reads) == [VIRTIO_MMIO_BASE + INTERRUPT_STATUS]
    result = run.run(90).result
    assert result.ok, result
    (features_ok, loop, after_reset, outside, flush) = [v[:3] for v in run.values]
    assert features_ok == (ACK_DRIVER_FEATURES_OK | DRIVER_OK, 0, 0)  # features accepted, device live
    for status, isr, polls_left in (loop, outside):
        assert status == ACK_DRIVER_FEATURES_OK | DRIVER_OK | NEEDS_RESET
        assert isr == INT_CONFIG_CHANGE | INT_USED_BUFFER  # the used-buffer bit always reads as set
        assert polls_left > 0  # it showed up while the guest was still polling
    assert after_reset == (0, 0, 0)
    used_idx, used_len, request_status = flush
    assert (used_idx, used_len, request_status) == (1, 1, 0)  # VIRTIO_BLK_S_OK
    assert blk.flushes == 1


@NEEDS_VHOST_NET
def test_a_hostile_ring_stops_vhost_net_not_the_vmm(payload_vm: MakePayloadVm) -> None:
    """vhost-net's rings are the kernel's to walk: a looping receive chain makes vhost-net stop the
    ring (drivers/vhost/vhost.c, vhost_get_vq_desc: "Loop detected") and nothing else; a device
    reset takes the ring back, and a good buffer then receives one of the frames the host sends."""
    run = payload_vm(guest("vhost_net_hostile"))
    nic = open_nic(parse_network(f"mode=tap,tapif={HOSTILE_TAP}"))
    run.vm.add_virtio(nic)
    assert isinstance(nic, VhostNet), "/dev/vhost-net did not open (load the vhost_net module)"
    subprocess.run(["ip", "link", "set", HOSTILE_TAP, "up"], check=True, capture_output=True, timeout=30)
    stop = threading.Event()
    # an Ethernet broadcast of the local experimental type every 10 ms, from the host into the tap
    frame = b"\xff" * 6 + bytes.fromhex("021515151599") + b"\x88\xb5" + bytes(46)

    def send() -> None:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
            s.bind((HOSTILE_TAP, 0))
            while not stop.wait(0.01):
                s.send(frame)
    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        result = run.run(180).result
    finally:
        stop.set()
        sender.join(5)
    assert result.ok, result
    (set_up, looped, after_reset, received) = [v[:3] for v in run.values]
    assert set_up == (ACK_DRIVER_FEATURES_OK | DRIVER_OK, 0, 0)
    # frames went on arriving (every 10 ms, from before the guest started) while the loop was
    # there: the kernel used nothing of it
    assert looped == (0, 0, 0)
    assert after_reset == (0, 0, 0)
    used_idx, used_len, polls_left = received
    assert used_idx == 1 and used_len >= VIRTIO_NET_HEADER + len(frame) and polls_left > 0


@NEEDS_VHOST_VSOCK
def test_a_hostile_ring_stops_vhost_vsock_not_the_vmm(payload_vm: MakePayloadVm) -> None:
    """A looping transmit chain makes vhost-vsock stop that ring (vhost_get_vq_desc: "Loop
    detected") and nothing else; after a device reset, a well-formed connection request reaches
    a host socket, and the host's answer reaches the guest's receive ring; and again after a
    machine reset (PSCI SYSTEM_RESET), in the guest's second boot."""
    run = payload_vm(guest("vsock_hostile"))
    run.vm.add_virtio(VhostVsock(HOSTILE_CID))
    accepted: list[tuple[int, int]] = []
    held: list[socket.socket] = []  # closed after the run: a close's SHUTDOWN would reach the guest's next boot
    with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as listener:
        listener.bind((socket.VMADDR_CID_ANY, HOSTILE_PORT))
        listener.listen(1)
        listener.settimeout(180)

        def accept() -> None:
            for _ in range(2):
                conn, peer = listener.accept()
                accepted.append(peer)
                held.append(conn)
        acceptor = threading.Thread(target=accept, daemon=True)
        acceptor.start()
        result = run.run(180).result
        acceptor.join(10)
    for conn in held:
        conn.close()
    assert result.ok, result
    (set_up, looped, after_reset, answered, answered_after_reboot) = [v[:3] for v in run.values]
    assert set_up == (ACK_DRIVER_FEATURES_OK | DRIVER_OK, HOSTILE_CID, 0)  # the CID in its configuration
    assert looped == (0, 0, 0)  # the kernel used nothing of the loop
    assert after_reset == (0, 0, 0)
    assert answered == answered_after_reboot == (1, VSOCK_HEADER, VIRTIO_VSOCK_OP_RESPONSE)  # accepted
    assert run.vm.resets == 1
    assert accepted == [(HOSTILE_CID, HOSTILE_GUEST_PORT), (HOSTILE_CID, HOSTILE_GUEST_PORT + 1)]

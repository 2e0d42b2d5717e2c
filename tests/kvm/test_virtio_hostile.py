"""A hostile virtio driver on real KVM: an assembled guest feeds pyvmm's virtio-blk a looping
descriptor chain and a buffer outside RAM, kicking through the ioeventfd. The device must ask
for a reset (DEVICE_NEEDS_RESET plus a configuration-change interrupt) and work again after it."""

from __future__ import annotations

from pathlib import Path

from pyvmm.devices.virtio.blk import VirtioBlk
from pyvmm.testing.payloads import MakePayloadVm
from tests.kvm.conftest import NEEDS_FILTER, guest

pytestmark = NEEDS_FILTER

ACK_DRIVER_FEATURES_OK = 1 | 2 | 8
DRIVER_OK, NEEDS_RESET = 4, 0x40
INT_USED_BUFFER, INT_CONFIG_CHANGE = 1, 2


def test_malformed_chains_break_the_device_not_the_vmm(payload_vm: MakePayloadVm, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    run = payload_vm(guest("virtio_hostile"))
    vm = run.vm
    blk = VirtioBlk(str(disk))
    vm.add_virtio(blk)
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

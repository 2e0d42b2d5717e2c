// A hostile virtio driver against a vhost-net NIC at 0x3000000 (virtio-mmio version 2): the
// kernel, not pyvmm, walks its rings. It sets up the receive queue (queue 0) properly (virtio 1.2
// §3.1.1), then makes available a writable descriptor chain that loops (0 -> 1 -> 0) while the
// host sends it frames: vhost-net refuses the chain and stops the ring; pyvmm and the guest go on.
// After a device reset (which takes the ring back from the kernel), a well-formed buffer must
// receive a frame. Reports (x1..x3):
//   1: status after the set-up (ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK), 0, 0
//   2: used index after the looping chain had its time, 0, 0
//   3: status after the reset, 0, 0
//   4: used index, used length, memory polls left (a good buffer after the reset)
    .include "pyvmm.inc"
    .include "virtio_mmio.inc"

    .equ SPINS, 0x40000000                 // memory polls
    .equ VRING_DESC_F_NEXT_WRITE, 3
    .equ VRING_DESC_F_WRITE, 2

    .text
    .global _start
_start:
    movl x20, VIRTIO
    bl setup
    ldr w1, [x20, #STATUS]
    mov x2, #0
    mov x3, #0
    report

    // a loop: 0 -> 1 -> 0, both writable, while frames arrive
    desc 0, BUF, 2048, VRING_DESC_F_NEXT_WRITE, 1
    desc 1, BUF + 2048, 2048, VRING_DESC_F_NEXT_WRITE, 0
    bl make_available
    report_used_after USED, SPINS / 4       // time for frames to meet the loop
    reset_and_report                        // vhost-net gives the ring back

    // a well-formed receive buffer: header and frame in one writable descriptor
    bl setup
    desc 0, BUF, 4096, VRING_DESC_F_WRITE, 0
    bl make_available
    wait_used USED, SPINS
    report
    system_off

    virtio_functions

    .ltorg

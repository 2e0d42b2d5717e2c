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

    .equ VIRTIO, 0x3000000
    .equ STATUS, 0x70
    .equ QUEUE_NOTIFY, 0x50
    .equ RAM, 0x80000000
    .equ DESC, RAM + 0x100000
    .equ AVAIL, RAM + 0x101000
    .equ USED, RAM + 0x102000
    .equ BUF, RAM + 0x103000
    .equ SPINS, 0x40000000                 // memory polls
    .equ VRING_DESC_F_NEXT_WRITE, 3
    .equ VRING_DESC_F_WRITE, 2

    .macro mmio_w off, val
    movl w9, \val
    str w9, [x20, #\off]
    .endm

// desc[\i] = {addr, len, flags, next}; clobbers x9, x10
    .macro desc i, addr, len, flags, next
    movl x9, DESC + 16 * \i
    ldr x10, =\addr
    str x10, [x9]
    movl w10, \len
    str w10, [x9, #8]
    mov w10, #\flags
    strh w10, [x9, #12]
    mov w10, #\next
    strh w10, [x9, #14]
    .endm

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
    movl x3, SPINS / 4                      // time for frames to meet the loop
1:  subs x3, x3, #1
    b.ne 1b
    movl x11, USED
    ldrh w1, [x11, #2]
    mov x2, #0
    report

    mmio_w STATUS, 0                        // the reset: vhost-net gives the ring back
    ldr w1, [x20, #STATUS]
    mov x2, #0
    mov x3, #0
    report

    // a well-formed receive buffer: header and frame in one writable descriptor
    bl setup
    desc 0, BUF, 4096, VRING_DESC_F_WRITE, 0
    bl make_available
    movl x11, USED
    movl x3, SPINS
2:  ldrh w1, [x11, #2]
    cbnz w1, 3f
    subs x3, x3, #1
    b.ne 2b
3:  ldr w2, [x11, #8]                      // used.ring[0].len
    report
    system_off

// Reset and bring the device up (VIRTIO_F_VERSION_1 only) with queue 0 of 8 entries at
// DESC/AVAIL/USED; zero the rings.
setup:
    movl x9, DESC
    mov x10, #0x3000
4:  subs x10, x10, #8
    str xzr, [x9, x10]
    b.ne 4b
    mmio_w STATUS, 0
    mmio_w STATUS, 1                       // ACKNOWLEDGE
    mmio_w STATUS, 3                       // DRIVER
    mmio_w 0x24, 1                         // DriverFeaturesSel = 1
    mmio_w 0x20, 1                         // VIRTIO_F_VERSION_1 (bit 32)
    mmio_w 0x24, 0
    mmio_w 0x20, 0
    mmio_w STATUS, 11                      // FEATURES_OK
    mmio_w 0x30, 0                         // QueueSel
    mmio_w 0x38, 8                         // QueueNum
    mmio_w 0x80, DESC
    mmio_w 0x84, 0
    mmio_w 0x90, AVAIL
    mmio_w 0x94, 0
    mmio_w 0xa0, USED
    mmio_w 0xa4, 0
    mmio_w 0x44, 1                         // QueueReady
    mmio_w STATUS, 15                      // DRIVER_OK
    ret

// avail.ring[0] = 0, avail.idx = 1, then notify queue 0
make_available:
    movl x9, AVAIL
    strh wzr, [x9, #4]
    dsb sy                                  // ring entry before the index (§2.7.13)
    mov w10, #1
    strh w10, [x9, #2]
    dsb sy                                  // index before the notification
    str wzr, [x20, #QUEUE_NOTIFY]
    ret

    .ltorg

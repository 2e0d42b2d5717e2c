// A hostile virtio driver against pyvmm's virtio-blk at 0x3000000 (virtio-mmio version 2).
// It sets the device up properly (virtio 1.2 §3.1.1), then makes available a descriptor chain
// that loops (0 -> 1 -> 0) and kicks through QueueNotify, which KVM turns into an ioeventfd
// signal. pyvmm must mark the device DEVICE_NEEDS_RESET with a configuration-change interrupt,
// not hang or crash; after a reset a chain whose buffer lies outside RAM must do the same; after
// another reset a well-formed FLUSH request must complete. Reports (x1..x3):
//   1: status after the set-up (ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK), 0, 0
//   2: status, InterruptStatus, polls left when NEEDS_RESET showed up (loop)
//   3: status after the reset, 0, 0
//   4: status, InterruptStatus, polls left (buffer outside RAM)
//   5: used index, used length, the request's status byte (FLUSH after a reset)
    .include "pyvmm.inc"
    .include "virtio_mmio.inc"

    .equ POLLS, 20000                      // register polls (each one an exit)
    .equ SPINS, 0x10000000                 // memory polls

    .text
    .global _start
_start:
    movl x20, VIRTIO
    bl setup
    ldr w1, [x20, #STATUS]
    mov x2, #0
    mov x3, #0
    report

    // a loop: 0 -> 1 -> 0
    desc 0, BUF, 16, 1, 1
    desc 1, BUF, 16, 1, 0
    bl make_available
    bl wait_needs_reset
    report

    reset_and_report

    // a buffer far outside guest RAM
    bl setup
    desc 0, 0x10, 0xFFFFFFFF, 0, 0
    bl make_available
    bl wait_needs_reset
    report

    // after a reset, a well-formed FLUSH: header (type 4) readable, status byte writable
    mmio_w STATUS, 0
    bl setup
    movl x9, BUF
    mov w10, #4
    str w10, [x9]
    str wzr, [x9, #4]
    str xzr, [x9, #8]
    mov w10, #0xFF
    strb w10, [x9, #0x100]
    desc 0, BUF, 16, 1, 1
    desc 1, BUF + 0x100, 1, 2, 0
    bl make_available
    wait_used USED, SPINS
    movl x9, BUF
    ldrb w3, [x9, #0x100]
    report
    system_off

    virtio_functions

// Poll the status register for DEVICE_NEEDS_RESET: x1 = status, x2 = InterruptStatus, x3 = polls left
wait_needs_reset:
    movl x3, POLLS
4:  ldr w1, [x20, #STATUS]
    tbnz w1, #6, 5f
    subs x3, x3, #1
    b.ne 4b
5:  ldr w2, [x20, #INTERRUPT_STATUS]
    str w2, [x20, #INTERRUPT_ACK]
    ret

    .ltorg

// Load from and store to a guest-physical address with no RAM or device (0x10000000), then
// report what the load returned; with the "stop" policy the run ends at the load instead.
    .include "pyvmm.inc"
    .text
    .global _start
_start:
    movl x10, 0x10000000
    movl w11, 0xdeadbeef
    str w11, [x10]
    ldr x1, [x10]
    mov x2, #1
    report
    system_off

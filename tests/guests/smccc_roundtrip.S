// Forwarded SMCCC calls over HVC, then SMC (one of them is not the VM's conduit and must get
// NOT_SUPPORTED), then an SMC32 call over the VM's conduit: for each, report the four results
// the guest received and whether x4..x17 survived the call.
    .include "pyvmm.inc"
    .text
    .global _start
_start:
    .irp conduit, hvc, smc
    fill_x4_x17
    movl w0, (SIP64_BASE + 1)
    movz x1, #0x1111
    movz x2, #0x2222
    movz x3, #0x3333
    \conduit #0
    mov x24, x0
    mov x25, x1
    mov x26, x2
    mov x27, x3
    check_x4_x17
    mov x1, x24
    mov x2, x25
    mov x3, x26
    mov x4, x27
    mov x5, x22
    report
    .endr

    // SMC32/HVC32 call: the results must arrive truncated to 32 bits
    movl w0, (SIP32_BASE + 1)
    mvn x1, xzr                 // all ones: the handler must see only w1
    firmware_call
    mov x2, x1
    mov x1, x0
    report
    system_off

// Benchmark loop: x9 rounds of SDEI_EVENT_SIGNAL to this PE, each entering the event 0 handler
// and leaving it with SDEI_EVENT_COMPLETE, timed with the virtual counter; then report (ticks,
// counter frequency, rounds, handler entries): the contract of hvc_loop.S.
    .include "pyvmm.inc"
    .text
    .global _start
_start:
    sdei_register 0, handler
    sdei1 SDEI_EVENT_ENABLE, 0
    sdei SDEI_PE_UNMASK
    mov x12, x9
    mrs x15, mpidr_el1
    isb
    mrs x13, cntvct_el0
1:  mov x1, #0
    mov x2, x15
    sdei SDEI_EVENT_SIGNAL
    subs x9, x9, #1
    b.ne 1b
    isb
    mrs x14, cntvct_el0
    adr x10, entries
    ldr x4, [x10]
    sub x1, x14, x13
    mrs x2, cntfrq_el0
    mov x3, x12
    report
    system_off

handler:
    adr x10, entries
    ldr x11, [x10]
    add x11, x11, #1
    str x11, [x10]
    sdei1 SDEI_EVENT_COMPLETE, 0
    b .

    .balign 8
entries: .quad 0

// Benchmark loop: x9 calls of function x10 over HVC (SMC in its _smc build), timed with the
// virtual counter, then report (ticks, counter frequency, calls, last x0). The loop counter lives in x9 (x4-x17 are
// preserved by every SMCCC call; in-kernel handlers clobber x0-x3).
    .include "pyvmm.inc"
    .text
    .global _start
_start:
    mov x12, x9
    isb
    mrs x13, cntvct_el0
1:  mov x0, x10
    firmware_call
    subs x9, x9, #1
    b.ne 1b
    isb
    mrs x14, cntvct_el0
    mov x4, x0
    sub x1, x14, x13
    mrs x2, cntfrq_el0
    mov x3, x12
    report
    system_off

// Benchmark guest: x9 times, report "ready" (x1 = 1) and spin with interrupts masked until the
// host-raised event 101's handler, whose first instruction is a report (x1 = 2), sets the flag.
    .include "pyvmm.inc"
    .text
    .global _start
_start:
    sdei_register 101, handler, 2       // argument 2: the handler's x1, its report tag
    sdei1 SDEI_EVENT_ENABLE, 101
    sdei SDEI_PE_UNMASK
    adr x20, flag
0:  str xzr, [x20]
    mov x1, #1
    report
1:  ldr x10, [x20]
    cbz x10, 1b
    subs x9, x9, #1
    b.ne 0b
    system_off

handler:
    report                              // the first instructions: x1 already holds 2
    mov x10, #1
    str x10, [x20]                      // x20: the interrupted context's, untouched by dispatch
    sdei1 SDEI_EVENT_COMPLETE, 0
    b .

    .balign 8
flag: .quad 0

// `make demo`, SDEI part: the guest registers a handler for event 0 and for platform event 100,
// signals event 0 to itself, then spins with every interrupt masked until the host raises event
// 100. Each step is reported to the demo (x1 = step, x2.. = values).
    .include "pyvmm.inc"
    .text
    .global _start
_start:
    sdei SDEI_VERSION
    mov x2, x0
    mov x1, #0
    report
    sdei_register 0, handler, 0x5eed
    sdei1 SDEI_EVENT_ENABLE, 0
    sdei SDEI_PE_UNMASK
    mov x1, #0
    mrs x2, mpidr_el1
    sdei SDEI_EVENT_SIGNAL              // the handler runs as this call returns
    mov x2, x0
    mov x1, #2
    report
    sdei_register 100, handler, 0x100
    sdei1 SDEI_EVENT_ENABLE, 100
    adr x20, flag
    str xzr, [x20]                      // event 0's handler set it
    msr daifset, #0xf                   // no interrupt can get in now; an SDEI event can
    mov x1, #3
    report
0:  ldr x10, [x20]
    cbz x10, 0b
    mov x1, #4
    report
    system_off

handler:                                // x0 event, x1 argument, x2 interrupted PC
    mov x3, x1
    mov x4, x2
    mov x2, x0
    mov x1, #1
    report
    mov x10, #1
    adr x9, flag
    str x10, [x9]
    sdei1 SDEI_EVENT_COMPLETE, 0
    b .

    .balign 8
flag: .quad 0

// SDEI on two vCPUs: cpu0 signals event 0 to cpu1 (EVENT_SIGNAL to another PE), then registers
// shared event 200 routed to cpu1 and the test raises it from the host. Reports:
//   1 cpu1's event 0 handler: x0, its MPIDR; SIGNAL's result on cpu0
//   2 REGISTER(200, routed to cpu1) result (the test raises event 200 now)
//   3 the shared handler: x0, the MPIDR it ran on
    .include "pyvmm.inc"
    .text
    .global _start
_start:
    mov x21, #1
    adr x22, secondary
    psci PSCI_CPU_ON64, x21, x22
0:  mov x21, #1
    psci PSCI_AFFINITY_INFO64, x21
    cbnz x0, 0b
    adr x9, ready1
1:  ldr x10, [x9]
    cbz x10, 1b
    mov x1, #0
    mov x2, #1                          // cpu1 (Aff0 = 1)
    sdei SDEI_EVENT_SIGNAL
    mov x21, x0
    adr x9, seen0
2:  ldr x10, [x9]
    cbz x10, 2b
    adr x9, slots
    ldp x2, x3, [x9]
    mov x4, x21
    mov x1, #1
    report

    sdei_register 200, handler_shared, 0, 1, 1
    mov x21, x0
    sdei1 SDEI_EVENT_ENABLE, 200
    sdei SDEI_PE_UNMASK                 // cpu0 is unmasked too: the routing picks cpu1
    mov x2, x21
    mov x1, #2
    report
    adr x9, seen200
3:  ldr x10, [x9]
    cbz x10, 3b
    adr x9, slots
    ldp x2, x3, [x9, #16]
    mov x1, #3
    report
    system_off

secondary:
    sdei_register 0, handler_private
    sdei1 SDEI_EVENT_ENABLE, 0
    sdei SDEI_PE_UNMASK
    mov x10, #1
    adr x9, ready1
    str x10, [x9]
    b .

handler_private:
    adr x9, slots
    mrs x10, mpidr_el1
    stp x0, x10, [x9]
    mov x10, #1
    adr x9, seen0
    str x10, [x9]
    sdei1 SDEI_EVENT_COMPLETE, 0
    b .

handler_shared:
    adr x9, slots
    mrs x10, mpidr_el1
    stp x0, x10, [x9, #16]
    mov x10, #1
    adr x9, seen200
    str x10, [x9]
    sdei1 SDEI_EVENT_COMPLETE, 0
    b .

    .balign 8
slots: .fill 4, 8, 0
ready1: .quad 0
seen0: .quad 0
seen200: .quad 0

// The `make demo` guest: calls the vendor service of examples/vendor_service.py, shows a call on
// the conduit the VM does not offer being refused, and does PSCI work: it brings up cpu1 with
// CPU_ON (cpu1 calls the service, then CPU_OFF), watches it with AFFINITY_INFO, powers off.
// Each observation goes to the demo as FN_REPORT (x1 = step, x2.. = values).
    .include "pyvmm.inc"
    .equ DEMO, 0xC6000000
    .text
    .global _start
_start:
    psci DEMO                            // 0: DEMO_VERSION
    mov x2, x0
    mov x1, #0
    report

    mov x21, #40
    mov x22, #2
    psci (DEMO + 1), x21, x22            // 1: DEMO_ADD(40, 2)
    mov x2, x0
    mov x1, #1
    report

    movz x21, #0x1111
    movz x22, #0x2222
    movz x23, #0x3333
    psci (DEMO + 2), x21, x22, x23       // 2: DEMO_SWAP, four results
    mov x5, x3
    mov x4, x2
    mov x3, x1
    mov x2, x0
    mov x1, #2
    report

    psci (DEMO + 0x42)                   // 3: no such function
    mov x2, x0
    mov x1, #3
    report

    movl w0, DEMO                        // 4: the conduit this VM does not offer
    .ifdef SMC
    hvc #0
    .else
    smc #0
    .endif
    mov x2, x0
    mov x1, #4
    report

    psci PSCI_VERSION                    // 5: PSCI, serviced by pyvmm
    mov x2, x0
    mov x1, #5
    report

    mov x21, #1                          // 6: CPU_ON(cpu1), then wait for it to turn itself off
    adr x22, secondary
    movz x23, #7
    psci PSCI_CPU_ON64, x21, x22, x23
    mov x24, x0
1:  mov x21, #1
    psci PSCI_AFFINITY_INFO64, x21
    cmp x0, #1
    b.ne 1b
    mov x2, x24
    mov x3, x0
    mov x1, #6
    report
    system_off

secondary:                               // 7: cpu1, context ID 7: DEMO_ADD(7, 35), then off
    mov x21, x0
    mov x22, #35
    psci (DEMO + 1), x21, x22
    mov x2, x0
    mrs x3, mpidr_el1
    mov x1, #7
    report
    psci PSCI_CPU_OFF
    b .

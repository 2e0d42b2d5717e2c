// The PMU seen from an AArch32 guest (a VM made with aarch32=True and the PMU, kvmtool's
// --aarch32 --pmu): PMUv3's CP15 registers (Arm ARM G8.4). The guest reads PMCR, starts the
// cycle counter and reads it twice with work between, and records (PMCR, first count, second
// count) as three words 64 KiB above the image, where the test reads them after the run; then
// it powers off. No SMCCC call is forwarded.
    .include "pyvmm32.inc"
    .equ PSCI_SYSTEM_OFF, 0x84000008
    .text
    .global _start
_start:
    adr r7, _start
    add r7, r7, #0x10000                // where the results go
    mrc p15, 0, r1, c9, c12, 0          // PMCR
    orr r0, r1, #1                      // PMCR.E: the counters count
    mcr p15, 0, r0, c9, c12, 0
    mov r0, #(1 << 31)
    mcr p15, 0, r0, c9, c12, 1          // PMCNTENSET: the cycle counter
    isb
    mrc p15, 0, r2, c9, c13, 0          // PMCCNTR (its low 32 bits)
    movw r4, #10000
1:  subs r4, r4, #1
    bne 1b
    isb
    mrc p15, 0, r3, c9, c13, 0
    str r1, [r7]
    str r2, [r7, #4]
    str r3, [r7, #8]
    dsb sy
    call PSCI_SYSTEM_OFF
    b .

// CPU_SUSPEND and SYSTEM_SUSPEND on 2 vCPUs, woken by the EL1 virtual timer's interrupt (made
// pending at the GIC; KVM wakes a suspended vCPU only for a pending interrupt). Reports:
//   1 power-down resumed at its entry point: context ID, CurrentEL, DAIF
//   2 standby returned: result      3 bad power_state / entry point: three results
//   4 SYSTEM_SUSPEND with cpu1 on: result       5 SYSTEM_SUSPEND resumed: context ID
//   6 SYSTEM_SUSPEND with an entry point outside RAM: result
    .include "pyvmm.inc"
    .text
    .global _start
_start:
    gic_enable_vtimer 2
    arm_timer
    movz x21, #1, lsl #16               // power_state: power-down, level 0, StateID 0
    adr x22, resume_powerdown
    movz x23, #0x5eed
    psci PSCI_CPU_SUSPEND64, x21, x22, x23
    movz x1, #0xbad                     // must not get here
    report
    b .

resume_powerdown:
    mov x20, x0
    disarm_timer
    gic_enable_vtimer 2
    mov x0, x20
    mov x2, x0
    mrs x3, currentel
    mrs x4, daif
    mov x1, #1
    report

    arm_timer
    psci PSCI_CPU_SUSPEND64              // power_state 0: standby
    disarm_timer
    mov x2, x0
    mov x1, #2
    report

    movz x21, #0x10, lsl #16            // reserved bit 20
    psci PSCI_CPU_SUSPEND64, x21
    mov x24, x0
    movz x21, #0x100, lsl #16           // PowerLevel 1: no such level
    psci PSCI_CPU_SUSPEND64, x21
    mov x25, x0
    movz x21, #1, lsl #16
    movz x22, #0x1000                   // power-down to an entry point outside RAM
    psci PSCI_CPU_SUSPEND64, x21, x22
    mov x4, x0
    mov x2, x24
    mov x3, x25
    mov x1, #3
    report

    mov x21, #1                         // cpu1 on (it waits for leave_now): SYSTEM_SUSPEND is DENIED
    adr x22, secondary_off
    psci PSCI_CPU_ON64, x21, x22
0:  mov x21, #1
    psci PSCI_AFFINITY_INFO64, x21
    cbnz x0, 0b                         // until it is ON, not just ON_PENDING
    adr x22, resume_system
    psci PSCI_SYSTEM_SUSPEND64, x22
    mov x2, x0
    mov x1, #4
    report
    mov w21, #1                         // now let cpu1 turn itself off
    adr x22, leave_now
    str w21, [x22]
1:  mov x21, #1                         // wait for cpu1 to be off again
    psci PSCI_AFFINITY_INFO64, x21
    cmp x0, #1
    b.ne 1b

    arm_timer
    adr x22, resume_system
    movz x23, #0xcafe
    psci PSCI_SYSTEM_SUSPEND64, x22, x23
    movz x1, #0xbad
    report
    b .

resume_system:
    disarm_timer
    mov x2, x0
    mov x1, #5
    report
    movz x22, #0x1000
    psci PSCI_SYSTEM_SUSPEND64, x22
    mov x2, x0
    mov x1, #6
    report
    system_off

secondary_off:
    adr x22, leave_now
0:  ldr w21, [x22]
    cbz w21, 0b
    psci PSCI_CPU_OFF
    b .

    .balign 4
leave_now: .word 0

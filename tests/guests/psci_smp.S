// PSCI on 4 vCPUs, serviced by pyvmm. Every result goes to the test through FN_REPORT with the
// step's tag in x1:
//   1 PSCI_VERSION                       6 CPU_OFF of cpu1 observed by AFFINITY_INFO
//   2 AFFINITY_INFO(n) before CPU_ON     7 concurrent CPU_ON(cpu1) result (one per caller)
//   3 CPU_ON(n)                          9 ON_PENDING: CPU_ON, CPU_ON again, AFFINITY_INFO
//   4 a secondary checks in (MPIDR, context ID, its boot count, its index)
//   5 AFFINITY_INFO(n) after CPU_ON      10 error codes and queries
// cpu0 commands a secondary through its `command` slot, which the secondary clears when it takes
// the command: cpu0 posts a command only into an empty slot (post), or a command not yet taken
// would be overwritten and lost, and cpu0 would wait for ever for what it asked.
    .include "pyvmm.inc"
    .text
    .global _start
_start:
    psci PSCI_VERSION
    mov x2, x0
    mov x1, #1
    report

    mov x20, #1                         // AFFINITY_INFO before: all secondaries OFF
1:  psci PSCI_AFFINITY_INFO64, x20
    mov x3, x0
    mov x2, x20
    mov x1, #2
    report
    add x20, x20, #1
    cmp x20, #4
    b.ne 1b

    mov x20, #1                         // CPU_ON cpu1..3 with context 0x100 + n
2:  adr x21, secondary
    add x22, x20, #0x100
    psci PSCI_CPU_ON64, x20, x21, x22
    mov x3, x0
    mov x2, x20
    mov x1, #3
    report
    add x20, x20, #1
    cmp x20, #4
    b.ne 2b

    mov x20, #1                         // wait until each has booted once
3:  ldr_slot w21, boots, x20
    cbz w21, 3b
    add x20, x20, #1
    cmp x20, #4
    b.ne 3b

    mov x20, #1                         // AFFINITY_INFO after: all ON
4:  psci PSCI_AFFINITY_INFO64, x20
    mov x3, x0
    mov x2, x20
    mov x1, #5
    report
    add x20, x20, #1
    cmp x20, #4
    b.ne 4b

    // CPU_OFF on cpu1, then CPU_ON the same vCPU again
    mov x20, #1
    bl turn_off
    mov x2, x0
    mov x3, x21
    mov x1, #6
    report
    adr x21, secondary
    mov x22, #0x201
    psci PSCI_CPU_ON64, x20, x21, x22
    mov x3, x0
    mov x2, x20
    mov x1, #3
    report
    mov x22, #2
    bl wait_boots

    // concurrent CPU_ON(cpu1) from cpu0, cpu2 and cpu3
    bl turn_off
    mov w21, #2
    mov x20, #2
    bl post
    mov x20, #3
    bl post
    mov x20, #1
    adr x21, secondary
    mov x22, #0x300
    psci PSCI_CPU_ON64, x20, x21, x22
    mov x2, x0
    mov x3, #0
    mov x1, #7
    report
    mov x22, #3
    bl wait_boots
    mov x20, #2                         // until cpu2 and cpu3 have made theirs
    bl wait_done
    mov x20, #3
    bl wait_done

    // ON_PENDING: the test holds cpu2's next power-on for a while
    mov x20, #2
    bl turn_off
    adr x21, secondary
    mov x22, #0x402
    psci PSCI_CPU_ON64, x20, x21, x22
    mov x23, x0
    psci PSCI_CPU_ON64, x20, x21, x22
    mov x24, x0
    psci PSCI_AFFINITY_INFO64, x20
    mov x4, x0
    mov x2, x23
    mov x3, x24
    mov x1, #9
    report
    mov x22, #2                         // let cpu2's held boot finish
    bl wait_boots

    // error codes and queries: each reported as (10, index, result)
    mov x20, #0
    movz x21, #7                                    // no such MPIDR
    adr x22, secondary
    psci PSCI_CPU_ON64, x21, x22                    // 0: INVALID_PARAMETERS
    bl report_error
    mov x21, #1
    psci PSCI_CPU_ON64, x21, x22                    // 1: ALREADY_ON
    bl report_error
    mov x21, #3
    movz x22, #0x1000
    psci PSCI_CPU_ON64, x21, x22                    // 2: INVALID_ADDRESS (below RAM)
    bl report_error
    mov x21, #1
    mov x22, #1
    psci PSCI_AFFINITY_INFO64, x21, x22             // 3: INVALID_PARAMETERS (level 1)
    bl report_error
    psci PSCI_CPU_FREEZE                            // 4: NOT_SUPPORTED (optional, absent)
    bl report_error
    psci 0x84000013                                 // 5: NOT_SUPPORTED (no such function)
    bl report_error
    mov x21, #1
    psci PSCI_MIGRATE64, x21                        // 6: NOT_SUPPORTED (no Trusted OS)
    bl report_error
    psci PSCI_MIGRATE_INFO_TYPE                     // 7: 2
    bl report_error
    movl w21, PSCI_CPU_ON64
    psci PSCI_FEATURES, x21                         // 8: 0
    bl report_error
    movl w21, PSCI_CPU_FREEZE
    psci PSCI_FEATURES, x21                         // 9: NOT_SUPPORTED
    bl report_error
    movl w21, 0x80000000
    psci PSCI_FEATURES, x21                         // 10: 0 (SMCCC_VERSION)
    bl report_error
    adr x21, secondary
    psci PSCI_SYSTEM_SUSPEND64, x21                 // 11: DENIED (others are on)
    bl report_error
    movz x21, #0x10, lsl #16
    psci PSCI_CPU_SUSPEND64, x21                    // 12: INVALID_PARAMETERS (reserved bit 20)
    bl report_error
    psci 0x8400FF01                                 // 13: Standard Secure Call UID
    bl report_error
    psci 0x8400FF03                                 // 14: Standard Secure Revision
    bl report_error
    psci 0x8500FF01                                 // 15: Standard Hypervisor Call UID
    bl report_error
    system_off

// x0..x3 -> report (10, x20 = index, x0, x1, x2, x3); x20++
report_error:
    mov x6, x3
    mov x5, x2
    mov x4, x1
    mov x3, x0
    mov x2, x20
    mov x1, #10
    report
    add x20, x20, #1
    ret

// Post command w21 to cpu<x20> once it has taken the one before (its slot is empty again).
post:
1:  ldr_slot w10, command, x20
    cbnz w10, 1b
    str_slot w21, command, x20
    ret

// Tell cpu<x20> to CPU_OFF and poll AFFINITY_INFO until it reports OFF.
// Returns x0 = the final AFFINITY_INFO result, x21 = polls made.
turn_off:
    mov x25, x30
    mov w21, #1
    bl post
    mov x21, #0
1:  add x21, x21, #1
    psci PSCI_AFFINITY_INFO64, x20
    cmp x0, #1
    b.eq 2f
    movz x22, #0x10, lsl #16             // give up after ~1M polls
    cmp x21, x22
    b.ne 1b
2:  mov x30, x25
    ret

// Wait until cpu<x20> has booted x22 times.
wait_boots:
1:  ldr_slot w23, boots, x20
    cmp x23, x22
    b.lo 1b
    ret

// Wait until cpu<x20> has carried out a CPU_ON command and reported its result.
wait_done:
1:  ldr_slot w23, done, x20
    cbz w23, 1b
    ret

// Secondaries enter here with x0 = context ID: count the boot, report, then obey commands.
secondary:
    mov x21, x0
    mrs x19, mpidr_el1
    and x19, x19, #0xff
    ldr_slot w23, boots, x19
    add w23, w23, #1
    str_slot w23, boots, x19
    mrs x2, mpidr_el1
    mov x3, x21
    mov x4, x23
    mov x5, x19
    mov x1, #4
    report
1:  ldr_slot w23, command, x19           // 1: CPU_OFF, 2: CPU_ON(cpu1)
    cbz w23, 1b
    str_slot wzr, command, x19
    cmp w23, #1
    b.eq 2f
    mov x20, #1
    adr x21, secondary
    mov x22, #0x300
    add x22, x22, x19
    psci PSCI_CPU_ON64, x20, x21, x22
    mov x2, x0
    mov x3, x19
    mov x1, #7
    report
    ldr_slot w23, done, x19
    add w23, w23, #1
    str_slot w23, done, x19
    b 1b
2:  psci PSCI_CPU_OFF
    movz x1, #0xbad                      // CPU_OFF returned: the test fails on this tag
    report
    b .

    .balign 8
boots:   .word 0, 0, 0, 0
command: .word 0, 0, 0, 0
done:    .word 0, 0, 0, 0               // CPU_ON commands each has carried out

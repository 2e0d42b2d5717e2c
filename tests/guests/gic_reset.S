// The vGIC across a SYSTEM_RESET (1-vCPU VM). The guest counts its boots in a RAM word outside
// its image (RAM survives a reset; the image is loaded again) and reports (1, boot) each time.
// Boot 1 enables, pends and activates SPIs 32-63 and PPI 20, raises their priorities, enables
// the distributor and vCPU 0's CPU interface (PMR, Group 1), reports what it reads back, and
// makes SPIs 32-47 level-triggered and SPIs 32-63 Group 0, and resets. Boot 2 reports the same
// registers, which a reset must have returned to their initial state, and powers off. Reports:
// (2, GICD ISENABLER1, ISPENDR1, ISACTIVER1, IPRIORITYR8, GICD_CTLR), (3, GICR ISENABLER0,
// ISPENDR0, ISACTIVER0, IPRIORITYR5), (4, ICC_PMR_EL1, ICC_IGRPEN1_EL1, GICD_ICFGR2,
// GICD_IGROUPR1).
    .include "common.inc"
    .equ GICR_SGI, GICD_BASE - 0x20000 + 0x10000    // vCPU 0's redistributor, its SGI frame
    .text
    .global _start
_start:
    report_boot
    cmp w20, #1
    b.ne 2f
    movl x10, GICD_BASE
    movl x12, GICR_SGI
    mov w11, #2                         // GICD_CTLR.EnableGrp1A
    str w11, [x10]
    movl w11, 0xffffffff
    str w11, [x10, #0x104]              // GICD_ISENABLER1: SPIs 32-63
    str w11, [x10, #0x204]              // GICD_ISPENDR1
    str w11, [x10, #0x304]              // GICD_ISACTIVER1
    movl w11, 0xa0a0a0a0
    str w11, [x10, #0x420]              // GICD_IPRIORITYR8: INTIDs 32-35
    str w11, [x12, #0x414]              // GICR_IPRIORITYR5: INTIDs 20-23
    mov w11, #(1 << 20)
    str w11, [x12, #0x100]              // GICR_ISENABLER0: PPI 20
    str w11, [x12, #0x200]              // GICR_ISPENDR0
    str w11, [x12, #0x300]              // GICR_ISACTIVER0
    str wzr, [x10, #0xc08]              // GICD_ICFGR2: INTIDs 32-47 level-triggered
    str wzr, [x10, #0x084]              // GICD_IGROUPR1: SPIs 32-63 in Group 0
    mov x11, #0xf0
    msr icc_pmr_el1, x11
    mov x11, #1
    msr icc_igrpen1_el1, x11
    isb
    dsb sy
    bl read_back
    psci PSCI_SYSTEM_RESET
    movz x1, #0xbad
    report
    b .
2:  bl read_back
    system_off

read_back:
    mov x24, x30
    movl x10, GICD_BASE
    movl x12, GICR_SGI
    ldr w2, [x10, #0x104]
    ldr w3, [x10, #0x204]
    ldr w4, [x10, #0x304]
    ldr w5, [x10, #0x420]
    ldr w6, [x10]
    mov x1, #2
    report
    ldr w2, [x12, #0x100]
    ldr w3, [x12, #0x200]
    ldr w4, [x12, #0x300]
    ldr w5, [x12, #0x414]
    mov x1, #3
    report
    mrs x2, icc_pmr_el1
    mrs x3, icc_igrpen1_el1
    ldr w4, [x10, #0xc08]
    ldr w5, [x10, #0x084]
    mov x1, #4
    report
    ret x24

// gic_reset.S for a vGICv2 (IHI 0048B): the same boots and reports, with the GICv2's registers.
// A GICv2 banks the SGI and PPI registers in the distributor (GICD_ISENABLER0, IPRIORITYR5, ...)
// and has a memory-mapped CPU interface (GICC, 128 KiB below the distributor) instead of the
// ICC_* system registers. Its interrupts start in Group 0, so boot 1 moves SPIs 32-63 to Group 1.
// Reports: (2, GICD ISENABLER1, ISPENDR1, ISACTIVER1, IPRIORITYR8, GICD_CTLR), (3, GICD
// ISENABLER0, ISPENDR0, ISACTIVER0, IPRIORITYR5), (4, GICC_PMR, GICC_CTLR, GICD_ICFGR2,
// GICD_IGROUPR1).
    .include "common.inc"
    .text
    .global _start
_start:
    report_boot
    cmp w20, #1
    b.ne 2f
    movl x10, GICD_BASE
    movl x12, GICC_BASE
    mov w11, #1                         // GICD_CTLR.Enable
    str w11, [x10]
    movl w11, 0xffffffff
    str w11, [x10, #0x104]              // GICD_ISENABLER1: SPIs 32-63
    str w11, [x10, #0x204]              // GICD_ISPENDR1
    str w11, [x10, #0x304]              // GICD_ISACTIVER1
    str w11, [x10, #0x084]              // GICD_IGROUPR1: SPIs 32-63 in Group 1
    movl w11, 0xa0a0a0a0
    str w11, [x10, #0x420]              // GICD_IPRIORITYR8: INTIDs 32-35
    str w11, [x10, #0x414]              // GICD_IPRIORITYR5 (banked): INTIDs 20-23
    mov w11, #(1 << 20)
    str w11, [x10, #0x100]              // GICD_ISENABLER0 (banked): PPI 20
    str w11, [x10, #0x200]              // GICD_ISPENDR0
    str w11, [x10, #0x300]              // GICD_ISACTIVER0
    str wzr, [x10, #0xc08]              // GICD_ICFGR2: INTIDs 32-47 level-triggered
    mov w11, #0xf0
    str w11, [x12, #0x4]                // GICC_PMR
    mov w11, #1
    str w11, [x12]                      // GICC_CTLR.EnableGrp0
    dsb sy
    isb
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
    movl x12, GICC_BASE
    ldr w2, [x10, #0x104]
    ldr w3, [x10, #0x204]
    ldr w4, [x10, #0x304]
    ldr w5, [x10, #0x420]
    ldr w6, [x10]
    mov x1, #2
    report
    ldr w2, [x10, #0x100]
    ldr w3, [x10, #0x200]
    ldr w4, [x10, #0x300]
    ldr w5, [x10, #0x414]
    mov x1, #3
    report
    ldr w2, [x12, #0x4]
    ldr w3, [x12]
    ldr w4, [x10, #0xc08]
    ldr w5, [x10, #0x084]
    mov x1, #4
    report
    ret x24

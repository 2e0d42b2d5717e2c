// The vGIC across a SYSTEM_RESET (1-vCPU VM), on a vGICv3 or a vGICv2. The guest counts its
// boots in a RAM word outside its image (RAM survives a reset; the image is loaded again) and
// reports (1, boot) each time. Boot 1 enables, pends and activates SPIs 32-63 and PPI 20, raises
// their priorities, enables the distributor and vCPU 0's CPU interface (PMR, its group), reports
// what it reads back, makes SPIs 32-47 level-triggered and moves SPIs 32-63 out of the group they
// start in (Group 1 on a GICv3, Group 0 on a GICv2), and resets. Boot 2 reports the same
// registers, which a reset must have returned to their initial state, and powers off.
// The private (SGI/PPI) registers are at the same offsets in a GICv3 redistributor's SGI frame
// and in a GICv2 distributor, which banks them per CPU (IHI 0069 §12.10, IHI 0048B §4.3); the
// CPU interface is the ICC_* system registers on a GICv3 and the memory-mapped GICC on a GICv2.
// Which one: ID_AA64PFR0_EL1.GIC, nonzero only with the GICv3 system registers.
// Reports: (2, GICD ISENABLER1, ISPENDR1, ISACTIVER1, IPRIORITYR8, GICD_CTLR), (3, private
// ISENABLER0, ISPENDR0, ISACTIVER0, IPRIORITYR5), (4, PMR, the CPU interface's group enable,
// GICD_ICFGR2, GICD_IGROUPR1).
    .include "pyvmm.inc"
    .equ GICR_SGI, GICD_BASE - 0x20000 + 0x10000    // vCPU 0's redistributor, its SGI frame
    .text
    .global _start
_start:
    report_boot
    mrs x25, id_aa64pfr0_el1
    ubfx x25, x25, #24, #4              // x25: 0 on a GICv2
    cmp w20, #1
    b.ne 2f
    bl bases
    mov w11, #2                         // GICD_CTLR.EnableGrp1A (GICv3)
    cbnz x25, 1f
    mov w11, #1                         // GICD_CTLR.Enable (GICv2)
1:  str w11, [x10]
    movl w11, 0xffffffff
    str w11, [x10, #0x104]              // GICD_ISENABLER1: SPIs 32-63
    str w11, [x10, #0x204]              // GICD_ISPENDR1
    str w11, [x10, #0x304]              // GICD_ISACTIVER1
    mov w13, wzr                        // GICD_IGROUPR1: SPIs 32-63 to Group 0 (GICv3) ...
    cbnz x25, 1f
    mov w13, w11                        // ... or to Group 1 (GICv2)
1:  str w13, [x10, #0x084]
    movl w11, 0xa0a0a0a0
    str w11, [x10, #0x420]              // GICD_IPRIORITYR8: INTIDs 32-35
    str w11, [x12, #0x414]              // IPRIORITYR5: INTIDs 20-23
    mov w11, #(1 << 20)
    str w11, [x12, #0x100]              // ISENABLER0: PPI 20
    str w11, [x12, #0x200]              // ISPENDR0
    str w11, [x12, #0x300]              // ISACTIVER0
    str wzr, [x10, #0xc08]              // GICD_ICFGR2: INTIDs 32-47 level-triggered
    cbz x25, 1f
    mov x11, #0xf0
    msr icc_pmr_el1, x11
    mov x11, #1
    msr icc_igrpen1_el1, x11
    b 3f
1:  mov w11, #0xf0
    str w11, [x14, #0x4]                // GICC_PMR
    mov w11, #1
    str w11, [x14]                      // GICC_CTLR.EnableGrp0
3:  isb
    dsb sy
    bl read_back
    psci PSCI_SYSTEM_RESET
    movz x1, #0xbad
    report
    b .
2:  bl read_back
    system_off
// x10: the distributor; x12: the private registers (redistributor SGI frame or distributor);
// x14: a GICv2's CPU interface
bases:
    movl x10, GICD_BASE
    movl x14, GICC_BASE
    mov x12, x10
    cbz x25, 1f
    movl x12, GICR_SGI
1:  ret
read_back:
    mov x24, x30
    bl bases
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
    cbz x25, 1f
    mrs x2, icc_pmr_el1
    mrs x3, icc_igrpen1_el1
    b 3f
1:  ldr w2, [x14, #0x4]                 // GICC_PMR
    ldr w3, [x14]                       // GICC_CTLR
3:  bl bases
    ldr w4, [x10, #0xc08]
    ldr w5, [x10, #0x084]
    mov x1, #4
    report
    ret x24

// The ITS and the LPIs across a SYSTEM_RESET (1-vCPU VM, --irqchip=gicv3-its: the ITS's 128 KiB
// right below vCPU 0's redistributor, pyvmm/machine/gic.py). Boot 1 gives the ITS a command queue
// and its device and collection tables (KVM enables an ITS only with all three) and enables it,
// gives the redistributor an LPI configuration table and enables its LPIs, and
// resets; boot 2 powers off. Each boot records what it reads back (GITS_CTLR, GITS_CBASER,
// GICR_CTLR, GICR_PROPBASER; IHI 0069 §12.11, §12.19) in RAM 68 KiB above the image, boot 2's
// 32 bytes after boot 1's, for the test to read after the run: no SMCCC call is forwarded.
    .include "pyvmm.inc"
    .equ GICR_BASE, GICD_BASE - 0x20000
    .equ GITS_BASE, GICR_BASE - 0x20000
    .equ GITS_CTLR, 0x00
    .equ GITS_CBASER, 0x80
    .equ GITS_BASER, 0x100              // BASER0: the device table, BASER1: the collections'
    .equ GICR_CTLR, 0x00
    .equ GICR_PROPBASER, 0x70
    .text
    .global _start
_start:
    count_boot                          // x19: the count word, 64 KiB above the image
    add x21, x19, #0x1000               // where this boot records
    movl x10, GITS_BASE
    movl x11, GICR_BASE
    cmp w20, #1
    b.ne 1f
    add x12, x19, #0x10, lsl #12        // the command queue: one 4 KiB page, 128 KiB up
    orr x12, x12, #(1 << 63)            // GITS_CBASER.Valid, Size 0 (one page)
    str x12, [x10, #GITS_CBASER]
    add x12, x19, #0x30, lsl #12        // the device table, 256 KiB up: one 4 KiB page
    orr x12, x12, #(1 << 63)            // Valid, 4 KiB pages, Size 0 (one page)
    str x12, [x10, #GITS_BASER]
    add x12, x12, #0x1000               // the collection table, one page above
    str x12, [x10, #GITS_BASER + 8]
    mov w13, #1
    str w13, [x10, #GITS_CTLR]          // Enabled
    add x12, x19, #0x20, lsl #12        // the LPI configuration table, 192 KiB up
    add x12, x12, #13                   // IDbits: 14 bits of INTID
    str x12, [x11, #GICR_PROPBASER]
    str w13, [x11, #GICR_CTLR]          // EnableLPIs
    dsb sy
    bl record
    psci PSCI_SYSTEM_RESET
    b .
1:  add x21, x21, #32
    bl record
    system_off

record:
    ldr w2, [x10, #GITS_CTLR]
    ldr x3, [x10, #GITS_CBASER]
    ldr w4, [x11, #GICR_CTLR]
    ldr x5, [x11, #GICR_PROPBASER]
    stp x2, x3, [x21]
    stp x4, x5, [x21, #16]
    ret

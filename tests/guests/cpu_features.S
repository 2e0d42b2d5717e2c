// The CPU the guest sees (pyvmm/machine/cpu_features.py): its ID registers, then an SVE, a pointer
// authentication and an MTE-tagged access, each only where the ID registers say the feature is
// there. Every exception comes back here (the vector table records ESR_EL1 in x20 and skips the
// instruction), so a fault is reported as a value, not a hang.
//   report 1: ID_AA64PFR0_EL1, ID_AA64PFR1_EL1, ID_AA64ISAR1_EL1, ID_AA64DFR0_EL1
//   report 2 (SVE): vector length in bytes (RDVL), sum of INDEX 1,1 over its bytes, fault ESR
//   report 3 (PAC): pointer, signed (PACIA), authenticated (AUTIA), PACGA's top half, fault ESR
//   report 4 (MTE): tag read back (LDG), value loaded through the right tag, ESR of a load through
//                   a wrong tag (a tag check fault: EC 0x25, DFSC 0x11), fault ESR of the rest
    .include "pyvmm.inc"
    .arch armv8.5-a+sve+memtag

    .equ SCTLR_ENIA, 1 << 31
    .equ SCTLR_ATA, 1 << 43             // EL1 may access allocation tags
    .equ SCTLR_TCF_SYNC, 1 << 40        // TCF (41:40) = 01: a tag check fault is synchronous

    .text
    .global _start
_start:
    set_vectors vectors

    mrs x2, id_aa64pfr0_el1
    mrs x3, id_aa64pfr1_el1
    mrs x4, id_aa64isar1_el1
    mrs x5, id_aa64dfr0_el1
    mov x1, #1
    report

// --- SVE -------------------------------------------------------------------------------------
    mrs x9, id_aa64pfr0_el1
    ubfx x9, x9, #32, #4                // SVE
    cbz x9, no_sve
    mov x20, #0
    sve_on
    rdvl x2, #1
    ptrue p0.b
    index z0.b, #1, #1
    uaddv d1, p0, z0.b
    fmov x3, d1
    mov x4, x20
    mov x1, #2
    report
no_sve:

// --- pointer authentication ------------------------------------------------------------------
    mrs x9, id_aa64isar1_el1
    ubfx x10, x9, #4, #8                // APA, API: address authentication
    cbz x10, no_pac
    mov x20, #0
    movl x10, 0x5eed1234
    msr S3_0_C2_C1_0, x10               // APIAKeyLo_EL1
    msr S3_0_C2_C1_1, x10               // APIAKeyHi_EL1
    msr S3_0_C2_C3_0, x10               // APGAKeyLo_EL1
    msr S3_0_C2_C3_1, x10               // APGAKeyHi_EL1
    movz x10, #16                       // TCR_EL1.T0SZ = 16: 48-bit addresses, bits 54:48 for the PAC
    msr tcr_el1, x10
    mrs x10, sctlr_el1
    orr x10, x10, #SCTLR_ENIA
    msr sctlr_el1, x10
    isb
    adr x2, _start
    mov x11, #42                        // the modifier
    mov x3, x2
    pacia x3, x11
    mov x4, x3
    autia x4, x11
    pacga x5, x2, x11
    lsr x5, x5, #32
    mov x6, x20
    mov x1, #3
    report
no_pac:

// --- MTE: the MMU on, RAM Normal Tagged --------------------------------------------------------
    mrs x9, id_aa64pfr1_el1
    ubfx x9, x9, #8, #4                 // MTE: 2 or more has the instructions and the tag checks
    cmp x9, #2
    b.lo no_mte
    mov x20, #0
    mmu_on table, 0xf000                // attr 0 Device-nGnRnE, attr 1 Normal Tagged write-back
    mrs x10, sctlr_el1
    orr x10, x10, #SCTLR_ATA
    orr x10, x10, #SCTLR_TCF_SYNC
    msr sctlr_el1, x10
    isb
    adr x12, granule
    mov x13, x12
    movk x13, #0x0500, lsl #48          // the granule's address with tag 5 (bits 59:56)
    stg x13, [x13]                      // its allocation tag: 5
    movz x14, #0x7a6
    str x14, [x13]                      // a store through the right tag
    mov x2, x12
    ldg x2, [x12]                       // the tag read back into x2's top byte
    ubfx x2, x2, #56, #4
    ldr x3, [x13]                       // a load through the right tag
    mov x21, x20
    mov x20, #0
    mov x15, x12
    movk x15, #0x0600, lsl #48          // the wrong tag
    ldr x16, [x15]                      // a tag check fault
    mov x4, x20
    mov x5, x21
    mov x1, #4
    report
no_mte:
    system_off

// Every exception: ESR_EL1 into x20, then on past the instruction that took it.
    .balign 2048
vectors:
    .rept 16
    mrs x20, esr_el1
    mrs x19, elr_el1
    add x19, x19, #4
    msr elr_el1, x19
    eret
    .balign 128
    .endr

// Level-1 table: 0-2 GiB device (the UART, the GIC), 2-4 GiB Normal Tagged (RAM)
    .balign 4096
table:
    block 0x00000000, 0, 0
    block 0x40000000, 0, 0
    block 0x80000000, 1
    block 0xC0000000, 1
    .skip 4096 - 32
    .balign 16
granule:
    .quad 0, 0

// The PMU (--pmu): its cycle counter counts, and its overflow raises PPI 7 (INTID 23), which
// the guest takes as an IRQ (one vCPU; the vGIC either version).
//   report 1: ID_AA64DFR0_EL1.PMUVer, PMCR_EL0.N (event counters)
//   report 2: the cycle counter before and after a loop
//   report 3: the interrupt taken (its INTID, 0 if none came), PMOVSSET_EL0 when it came
    .include "pyvmm.inc"

    .equ GICC_IAR, 0x0C                 // a GICv2 CPU interface's acknowledge and end registers
    .equ GICC_EOIR, 0x10
    .equ CYCLES, 1 << 31                // the cycle counter's bit in PMCNTEN*, PMINTEN*, PMOVS*

    .text
    .global _start
_start:
    set_vectors vectors
    mrs x2, id_aa64dfr0_el1
    ubfx x2, x2, #8, #4                 // PMUVer: 0 none, 0xf IMPLEMENTATION DEFINED, else PMUv3
    mov x3, #0
    cbz x2, 1f
    cmp x2, #0xf
    b.eq 1f
    mrs x3, pmcr_el0                    // (without a PMU this register is UNDEFINED)
    ubfx x3, x3, #11, #5                // N
1:  mov x1, #1
    report
    mrs x9, id_aa64dfr0_el1
    ubfx x9, x9, #8, #4
    cbz x9, done
    cmp x9, #0xf
    b.eq done

    // a known state: KVM resets the enables and overflow flags to UNKNOWN values (sys_regs.c)
    mov x10, #0xffffffff
    msr pmcntenclr_el0, x10
    msr pmintenclr_el1, x10
    msr pmovsclr_el0, x10
    mov x10, #0b101                     // PMCR_EL0: E (enable), C (cycle counter to 0); LC 0: 32-bit wrap
    msr pmcr_el0, x10
    msr pmccfiltr_el0, xzr              // count at EL1 and EL0
    mov x10, #CYCLES
    msr pmcntenset_el0, x10
    isb
    mrs x22, pmccntr_el0
    movz x12, #0x4, lsl #16
4:  subs x12, x12, #1
    b.ne 4b
    mrs x3, pmccntr_el0
    mov x2, x22
    mov x1, #2
    report

    gic_enable_ppi 1, 23
    mov x24, #0                         // the INTID the IRQ handler took
    mov x25, #0                         // PMOVSSET_EL0 then
    mov x10, #CYCLES
    msr pmintenset_el1, x10
    movz x10, #0xff00
    movk x10, #0xffff, lsl #16          // 0xffffff00: 256 cycles before the 32-bit counter wraps
    msr pmccntr_el0, x10
    isb
    msr daifclr, #2                     // IRQs on
    movz x12, #0x100, lsl #16           // a bounded wait
2:  cbnz x24, 3f
    subs x12, x12, #1
    b.ne 2b
3:  msr daifset, #2
    mov x2, x24
    mov x3, x25
    mov x1, #3
    report
done:
    system_off

// IRQ at EL1h (vector +0x280): acknowledge, note the INTID and the overflow, clear it, end it.
    .balign 2048
vectors:
    .skip 0x280
    mrs x11, id_aa64pfr0_el1
    ubfx x11, x11, #24, #4
    cbz x11, 5f
    mrs x24, S3_0_C12_C12_0             // ICC_IAR1_EL1
    mrs x25, pmovsset_el0
    msr pmovsclr_el0, x25               // the overflows seen: the interrupt line drops
    msr S3_0_C12_C12_1, x24             // ICC_EOIR1_EL1
    eret
5:  movl x10, GICC_BASE
    ldr w24, [x10, #GICC_IAR]
    mrs x25, pmovsset_el0
    msr pmovsclr_el0, x25
    str w24, [x10, #GICC_EOIR]
    eret

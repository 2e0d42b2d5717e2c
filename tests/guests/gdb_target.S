// A guest for the GDB stub's tests (tests/kvm/test_gdb.py); the payload cache also links it as
// an ELF file at the start of RAM, 0x80000000, beside the flat binary, so that GDB knows its
// symbols. Two vCPUs: vCPU 0 walks through the labelled steps below; vCPU 1, started with PSCI
// CPU_ON, spins.
    .include "pyvmm.inc"
    .equ PSCI_CPU_ON, 0xC4000003
    .equ ALIAS_VA, 0x40000000           // a second virtual address of the first GiB of RAM

    .text
    .global _start
_start:
    // values `info registers` finds
    movz x19, #0x1919
    movk x19, #0x1919, lsl #48
    movz x20, #0x2020, lsl #16
    mov x21, #0x21
regs_set:
    nop
    // a store a hardware watchpoint catches
    adr x1, watched
    mov x2, #0x1234
store:
    str x2, [x1]
after_store:
    nop
    // CPU_ON of vCPU 1 (MPIDR 1) at `secondary`
    movl w0, PSCI_CPU_ON
    mov x1, #1
    adr x2, secondary
    mov x3, #0
    firmware_call
cpu_on_done:
    // the MMU on, 4K granule, 32-bit VAs (T0SZ = 32, walks start at level 1): two 1 GiB blocks,
    // VA 0x80000000 and VA 0x40000000 both to RAM at 0x80000000
    adr x0, l1_table
    movz x1, #0x0701                    // block: valid, AttrIndx 0, inner shareable, AF
    movk x1, #0x8000, lsl #16           // output address 0x80000000
    str x1, [x0, #8 * 2]
    str x1, [x0, #8 * (ALIAS_VA >> 30)]
    dc civac, x0                        // the walk reads the tables through the caches
    dsb sy
    mov x1, #0xff                       // MAIR attribute 0: normal memory, write-back
    msr mair_el1, x1
    movz x1, #(32 | (1 << 8) | (1 << 10) | (3 << 12))  // T0SZ 32; IRGN0, ORGN0 write-back; SH0 inner
    movk x1, #(1 << (23 - 16)), lsl #16 // EPD1: no TTBR1 walks
    movk x1, #2, lsl #32                // IPS: 40 bits
    msr tcr_el1, x1
    msr ttbr0_el1, x0
    tlbi vmalle1
    dsb sy
    isb
    mrs x1, sctlr_el1
    orr x1, x1, #(1 << 0)               // M
    orr x1, x1, #(1 << 2)               // C
    orr x1, x1, #(1 << 12)              // I
    msr sctlr_el1, x1
    isb
mmu_on:
    nop
    adr x1, magic
    ldr x2, [x1]
check_magic:
    nop
    // wait for the debugger to set `release` (or to interrupt this loop)
wait_release:
    adr x1, release
    ldr x2, [x1]
    cbz x2, wait_release
    system_off

secondary:
    add x5, x5, #1
    b secondary

    .balign 8
watched:
    .quad 0
magic:
    .quad 0x1111
release:
    .quad 0
    .balign 4096
l1_table:
    .fill 512, 8, 0

// x9 calls of pseudo-random SMCCC function IDs with random x1..x3, from a xorshift64 generator
// seeded with x10. IDs are drawn from PSCI (both widths), the owners' query IDs, the SiP test
// range, SDEI and the whole 32-bit space. PSCI calls that would change power state (CPU_SUSPEND,
// CPU_OFF, CPU_ON, SYSTEM_*) are replaced by PSCI_VERSION, so the guest survives to report.
// x4..x17 are checked after every call. Report: (1, calls made, mask of clobbered x4..x17).
    .include "pyvmm.inc"
    .equ DESTRUCTIVE, (1 << 1) | (1 << 2) | (1 << 3) | (1 << 8) | (1 << 9) | (1 << 14) | (1 << 18)
    .text
    .global _start
_start:
    mov x19, x10                        // generator state (must be non-zero)
    mov x20, x9                         // calls left
    mov x26, x9
    mov x27, #0                         // clobber mask, accumulated
    fill_x4_x17
loop:
    eor x19, x19, x19, lsl #13          // xorshift64 (Marsaglia)
    eor x19, x19, x19, lsr #7
    eor x19, x19, x19, lsl #17
    and x21, x19, #7
    ubfx x22, x19, #8, #8               // low bits for the chosen range
    cmp x21, #2
    b.hi 1f
    and x22, x22, #0x1f                 // 0-2: PSCI, SMC32 or SMC64
    movl w0, 0x84000000
    cmp x21, #2
    b.ne 0f
    movl w0, 0xC4000000
0:  orr x0, x0, x22
    b 9f
1:  cmp x21, #3
    b.ne 2f
    and x22, x22, #0x3f                 // 3: General Service Query of any owner
    lsl x22, x22, #24
    movl w0, 0x8000FF00
    orr x0, x0, x22
    ubfx x22, x19, #16, #2
    orr x0, x0, x22
    b 9f
2:  cmp x21, #4
    b.ne 3f
    movl w0, SIP64_BASE                 // 4: the test's SiP range
    orr x0, x0, x22
    b 9f
3:  cmp x21, #5
    b.ne 4f
    and x22, x22, #0x1f                 // 5: SDEI (0x20-0x3f: its 19 functions and beyond)
    movl w0, 0xC4000020
    orr x0, x0, x22
    b 9f
4:  lsr x0, x19, #32                    // 6-7: anything at all
9:  bic w23, w0, #0x40000000            // a PSCI ID (either width)?
    and w23, w23, #0xffffffe0
    movl w24, 0x84000000
    cmp x23, x24
    b.ne 10f
    and x23, x0, #0x1f
    movl w24, DESTRUCTIVE
    lsr x24, x24, x23
    tbz x24, #0, 10f
    movl w0, PSCI_VERSION
10: ror x1, x19, #11
    ror x2, x19, #23
    ror x3, x19, #37
    firmware_call
    check_x4_x17
    orr x27, x27, x22
    fill_x4_x17
    subs x20, x20, #1
    b.ne loop
    mov x2, x26
    mov x3, x27
    mov x1, #1
    report
    system_off

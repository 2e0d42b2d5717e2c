// Boot 1 resets the machine (PSCI SYSTEM_RESET); every later boot spins with every exception
// masked and never exits to the VMM. The boot counter lives in RAM outside the image, which a
// reset loads again.
    .include "common.inc"
    .text
    .global _start
_start:
    msr daifset, #0xf
    adr x19, _start
    add x19, x19, #0x10, lsl #12
    ldr w20, [x19]
    add w20, w20, #1
    str w20, [x19]
    cmp w20, #1
    b.ne 1f
    psci PSCI_SYSTEM_RESET
1:  b 1b

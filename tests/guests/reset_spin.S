// Boot 1 resets the machine (PSCI SYSTEM_RESET); every later boot spins with every exception
// masked and never exits to the VMM. The boot counter lives in RAM outside the image, which a
// reset loads again.
    .include "pyvmm.inc"
    .text
    .global _start
_start:
    msr daifset, #0xf
    count_boot
    cmp w20, #1
    b.ne 1f
    psci PSCI_SYSTEM_RESET
1:  b 1b

// SYSTEM_RESET and SYSTEM_RESET2: the guest counts its boots in a RAM word outside its image
// (RAM survives a reset; the image is loaded again) and reports (1, boot count) each time:
//   boot 1: SYSTEM_RESET   boot 2: SYSTEM_RESET2 vendor type (2, INVALID_PARAMETERS), then warm
//   boot 3: SYSTEM_OFF
    .include "pyvmm.inc"
    .text
    .global _start
_start:
    report_boot
    cmp w20, #1
    b.eq 1f
    cmp w20, #2
    b.eq 2f
    system_off
1:  psci PSCI_SYSTEM_RESET
    movz x1, #0xbad
    report
    b .
2:  movl w21, 0x80000000                // vendor-specific reset type: none is implemented
    psci PSCI_SYSTEM_RESET2_64, x21
    mov x2, x0
    mov x1, #2
    report
    psci PSCI_SYSTEM_RESET2_64          // SYSTEM_WARM_RESET
    movz x1, #0xbad
    report
    b .

// The only vCPU turns itself off: nothing can ever run again.
    .include "pyvmm.inc"
    .text
    .global _start
_start:
    psci PSCI_CPU_OFF
    b .

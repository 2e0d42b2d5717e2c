// The `make demo` guest: calls the demo vendor-hypervisor service (examples/smccc_demo.py) over
// HVC and over SMC, reports what came back, asks KVM's PSCI for its version, and powers off.
    .include "common.inc"
    .equ DEMO,         0xC6000000       // SMC64 fast call, owner 6 (vendor hypervisor)
    .equ DEMO_VERSION, DEMO + 0
    .equ DEMO_ADD,     DEMO + 1
    .equ DEMO_SWAP,    DEMO + 2
    .equ DEMO_REPORT,  DEMO + 0xF0
    .text
    .global _start
_start:
    movl w0, DEMO_VERSION
    hvc #0
    mov x1, x0
    movz x6, #0                          // x6 = which step this report is for
    bl report

    movl w0, DEMO_ADD
    mov x1, #40
    mov x2, #2
    hvc #0
    mov x1, x0
    movz x6, #1
    bl report

    movl w0, DEMO_SWAP                   // four results, over SMC this time
    movz x1, #0x1111
    movz x2, #0x2222
    movz x3, #0x3333
    smc #0
    movz x6, #2                          // x0..x3 already hold the results; shift them up
    mov x4, x3
    mov x3, x2
    mov x2, x1
    mov x1, x0
    bl report

    movl w0, (DEMO + 0x42)               // inside the forwarded range, but no such function
    smc #0
    mov x1, x0
    movz x6, #3
    bl report

    movl w0, PSCI_VERSION                // not forwarded: KVM's in-kernel PSCI answers
    hvc #0
    mov x1, x0
    movz x6, #4
    bl report
    system_off

report:
    movl w0, DEMO_REPORT
    hvc #0
    ret

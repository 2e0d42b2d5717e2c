// The counter service's guest: it calls each function and reports what it got back, with the
// step's tag in x1 (pyvmm.inc's convention; the tests read them with run.tagged(TAG)):
//   1  VERSION
//   2  ADD(5), then ADD(7): status, count
//   3  READ(0): status, count
//   4  READ(99): status
//   5  an ID in the range the service does not implement: status
//   6  PSCI CPU_ON(vCPU 1): SUCCESS with 2 vCPUs, INVALID_PARAMETERS with 1
//   7  TOTAL, once vCPU 1 is off again: status, total
//   8  (from vCPU 1) ADD(100): status, count
// then powers off. The plugin builds it for HVC or SMC (pyvmm.inc's firmware_call).
    .include "pyvmm.inc"

    .equ COUNTER_VERSION,   0xC3000000
    .equ COUNTER_ADD,       0xC3000001
    .equ COUNTER_READ,      0xC3000002
    .equ COUNTER_TOTAL,     0xC3000003
    .equ COUNTER_UNKNOWN,   0xC300000F

// report (\tag, x0, x1): a call's status and value
    .macro report_result tag
    mov x3, x1
    mov x2, x0
    mov x1, #\tag
    report
    .endm

    .text
    .global _start
_start:
    smccc COUNTER_VERSION
    report_value 1, x0

    .irp amount, 5, 7
    mov x1, #\amount
    smccc COUNTER_ADD
    report_result 2
    .endr

    mov x1, #0
    smccc COUNTER_READ
    report_result 3

    mov x1, #99
    smccc COUNTER_READ
    report_value 4, x0

    smccc COUNTER_UNKNOWN
    report_value 5, x0

    // vCPU 1 adds its own 100 and powers itself off; with one vCPU there is no vCPU 1
    mov x1, #1
    adr x2, secondary
    mov x3, #0
    smccc PSCI_CPU_ON64
    mov x19, x0
    report_value 6, x19
    cbnz x19, 2f
1:  mov x1, #1                          // AFFINITY_INFO(vCPU 1, level 0) until it is OFF (1)
    mov x2, #0
    smccc PSCI_AFFINITY_INFO64
    cmp x0, #1
    b.ne 1b
2:  smccc COUNTER_TOTAL
    report_result 7
    system_off

secondary:
    mov x1, #100
    smccc COUNTER_ADD
    report_result 8
    smccc PSCI_CPU_OFF
    b .

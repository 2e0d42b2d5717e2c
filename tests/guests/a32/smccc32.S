// An AArch32 guest's SMCCC calls. SMC32 calls are serviced as from AArch64; every SMC64 call gets
// NOT_SUPPORTED whoever would answer it from AArch64 (SMCCC 1.3 §5.2). Reports (tag in r1):
//   1 (PSCI_VERSION, SMCCC_VERSION, SiP SMC32 0x82000001 with r1 = 7)
//   2 (PSCI CPU_ON SMC64, SDEI_VERSION, SiP SMC64 0xC2000001, TRNG_RND64): each NOT_SUPPORTED
//   3 (CPU_ON SMC32 of cpu1 at a T32 entry point)
//   4 from cpu1 (its context ID, its CPSR): it runs T32 code in Supervisor mode
    .include "pyvmm32.inc"
    .text
    .arm
    .global _start
_start:
    call 0x84000000                     // PSCI_VERSION
    mov r8, r0
    call 0x80000000                     // SMCCC_VERSION (KVM answers it)
    mov r9, r0
    mov r1, #7
    call 0x82000001                     // a SiP SMC32 call the test serves
    mov r4, r0
    mov r3, r9
    mov r2, r8
    mov r1, #1
    report

    mov r1, #1
    adr r2, secondary
    mov r3, #0
    call 0xC4000003                     // PSCI CPU_ON, SMC64
    mov r8, r0
    call 0xC4000020                     // SDEI_VERSION
    mov r9, r0
    call 0xC2000001                     // the SiP service's SMC64 twin, registered by the test
    mov r10, r0
    call 0xC4000053                     // TRNG_RND64, which KVM answers for AArch64 callers
    mov r5, r0
    mov r4, r10
    mov r3, r9
    mov r2, r8
    mov r1, #2
    report

    mov r1, #1
    adr r2, secondary
    orr r2, r2, #1                      // bit 0: enter in T32 state (PSCI 1.1 §6.4.3.1)
    movw r3, #0x5A
    call 0x84000003                     // PSCI CPU_ON, SMC32
    mov r2, r0
    mov r1, #3
    report
    adr r4, booted
1:  ldr r5, [r4]                        // wait for cpu1 to check in
    cmp r5, #0
    beq 1b
    call 0x84000008                     // PSCI SYSTEM_OFF
    b .

    .thumb
    .balign 4
    .thumb_func
secondary:
    mov r7, r0                          // the context ID
    mrs r3, apsr                        // CPSR: mode, T, masks
    mov r2, r7
    mov r1, #4
    report
    adr r4, booted
    mov r5, #1
    str r5, [r4]
    dsb sy
    call 0x84000002                     // PSCI CPU_OFF
    b .

    .balign 4
booted: .word 0

// PV stolen time (Arm DEN0057A), found as a guest finds it: SMCCC_ARCH_FEATURES(PV_TIME_FEATURES),
// PV_TIME_FEATURES(PV_TIME_ST), then PV_TIME_ST for this vCPU's structure, whose stolen time
// is read before and after about two seconds of spinning (the test keeps the host's CPUs busy
// meanwhile, so that the vCPU waits for one).
//   report 1: ARCH_FEATURES's answer, PV_TIME_FEATURES's, PV_TIME_ST's (the structure's IPA or
//             NOT_SUPPORTED), the Standard Hypervisor owner's Call Count
//   report 2: revision and attributes (both 0), stolen time before, stolen time after (ns)
    .include "pyvmm.inc"

    .equ SMCCC_ARCH_FEATURES, 0x80000001
    .equ PV_TIME_FEATURES, 0xC5000020
    .equ PV_TIME_ST, 0xC5000021
    .equ STD_HYP_CALL_COUNT, 0x8500FF00   // a General Service Query: an SMC32 call (SMCCC 1.4 §6.2)

    .text
    .global _start
_start:
    movl x1, PV_TIME_FEATURES
    movl w0, SMCCC_ARCH_FEATURES
    firmware_call
    mov x22, x0
    movl x1, PV_TIME_ST
    movl w0, PV_TIME_FEATURES
    firmware_call
    mov x23, x0
    movl w0, PV_TIME_ST
    firmware_call
    mov x24, x0
    movl w0, STD_HYP_CALL_COUNT
    firmware_call
    mov x5, x0
    mov x2, x22
    mov x3, x23
    mov x4, x24
    mov x1, #1
    report
    tbnz x24, #63, done                 // NOT_SUPPORTED: no structure to read
    // read it cacheably, as KVM writes it (without FEAT_S2FWB a non-cacheable read may miss it)
    mmu_on table, 0xff00                // attr 1: Normal write-back, everywhere

    ldr w2, [x24]                       // revision
    ldr w10, [x24, #4]                  // attributes
    orr x2, x2, x10, lsl #32
    ldr x3, [x24, #8]
    mrs x10, cntfrq_el0
    lsl x10, x10, #1                    // two seconds of the virtual counter
    mrs x11, cntvct_el0
    add x10, x10, x11
1:  mrs x11, cntvct_el0
    cmp x11, x10
    b.lo 1b
    ldr x4, [x24, #8]
    mov x1, #2
    report
done:
    system_off

    .balign 4096
table:
    block 0x00000000, 1                 // the PV time region is in the first GiB
    block 0x40000000, 1
    block 0x80000000, 1
    block 0xC0000000, 1
    .skip 4096 - 32

// What a compiled exit loop would cost, for `make bench`: n round trips of KVM_RUN, a call into
// Python for the answer (a cffi callback given the function ID), KVM_SET_ONE_REG(x0), by raw
// syscalls. Only the handler is Python, as in a loop compiled through cffi's API mode that calls
// the service handler for the call itself; pyvmm's Python loop is measured against it.
//
//   long callback_loop(long vcpu_fd, long n, struct kvm_one_reg *x0, uint64_t (*answer)(uint64_t),
//                      const struct kvm_run *run)            (AAPCS64; returns 0 or -errno)

    .equ SYS_ioctl, 29
    .equ KVM_RUN, 0xae80
    .equ KVM_SET_ONE_REG, 0x4010aeac
    .equ HYPERCALL_NR, 32               // offsetof(struct kvm_run, hypercall.nr)

    .text
    .global callback_loop
callback_loop:
    stp x29, x30, [sp, #-64]!
    mov x29, sp
    stp x19, x20, [sp, #16]
    stp x21, x22, [sp, #32]
    str x23, [sp, #48]
    mov x19, x0
    mov x20, x1
    mov x21, x2
    mov x22, x3
    mov x23, x4
1:  mov x0, x19
    movz x1, #(KVM_RUN & 0xffff)
    mov x2, #0
    mov x8, #SYS_ioctl
    svc #0
    tbnz x0, #63, 2f                    // negative: -errno
    ldr x0, [x23, #HYPERCALL_NR]
    blr x22                             // x0 <- answer(function ID)
    ldr x9, [x21, #8]                   // x0->addr: where KVM_SET_ONE_REG reads the value
    str x0, [x9]
    mov x0, x19
    movz x1, #(KVM_SET_ONE_REG & 0xffff)
    movk x1, #(KVM_SET_ONE_REG >> 16), lsl #16
    mov x2, x21
    mov x8, #SYS_ioctl
    svc #0
    tbnz x0, #63, 2f
    subs x20, x20, #1
    b.ne 1b
    mov x0, #0
2:  ldp x19, x20, [sp, #16]
    ldp x21, x22, [sp, #32]
    ldr x23, [sp, #48]
    ldp x29, x30, [sp], #64
    ret

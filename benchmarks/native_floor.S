// The native-code floor of a forwarded SMCCC call, for `make bench`: n round trips of
// KVM_RUN + KVM_SET_ONE_REG(x0) by raw syscalls, with no exit handling at all. What any
// userspace VMM must pay at the least; pyvmm's Python path is measured against it in the same run.
//
//   long native_floor(long vcpu_fd, long n, struct kvm_one_reg *x0)   (AAPCS64; returns 0 or -errno)

    .equ SYS_ioctl, 29
    .equ KVM_RUN, 0xae80
    .equ KVM_SET_ONE_REG, 0x4010aeac

    .text
    .global native_floor
native_floor:
    mov x9, x0
    mov x10, x1
    mov x11, x2
    mov x8, #SYS_ioctl
1:  mov x0, x9
    movz x1, #(KVM_RUN & 0xffff)
    mov x2, #0
    svc #0
    tbnz x0, #63, 2f            // negative: -errno
    mov x0, x9
    movz x1, #(KVM_SET_ONE_REG & 0xffff)
    movk x1, #(KVM_SET_ONE_REG >> 16), lsl #16
    mov x2, x11
    svc #0
    tbnz x0, #63, 2f
    subs x10, x10, #1
    b.ne 1b
    mov x0, #0
2:  ret

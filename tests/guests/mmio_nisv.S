// A load pair from an address with no RAM: the abort has no valid ISV, so KVM cannot emulate it.
    .text
    .global _start
_start:
    movz x10, #0x1000, lsl #16
    ldp x1, x2, [x10]
    b .

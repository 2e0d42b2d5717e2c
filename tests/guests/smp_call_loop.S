// Benchmark loop on every vCPU at once: x9 calls of function x10 per vCPU, for x15 vCPUs (at
// most 8). vCPU 0 powers the others on (PSCI CPU_ON, context ID = the vCPU's index), waits until
// each has checked in, then lets them all go at once. Each times its own loop with the virtual
// counter (one count for the whole VM: KVM gives every vCPU the same CNTVOFF) and reports (its
// index, start, end, calls, last x0, counter frequency). vCPU 0 waits for every report, then powers the machine off.
// Loop state lives in x9-x15, which every SMCCC call preserves (x4-x17). With the MMU off data
// accesses are Device memory, where exclusives need not work: each vCPU has its own flag words.
    .include "pyvmm.inc"
    .text
    .global _start
_start:
    adr x12, calls                      // the secondaries' x9 and x10
    str x9, [x12]
    str x10, [x12, #8]
    mov x11, #1                         // power on vCPUs 1 .. x15-1
1:  cmp x11, x15
    b.hs 2f
    mov x1, x11                         // target: MPIDR Aff0 is the vCPU's index
    adr x2, secondary_entry
    mov x3, x11                         // context ID: the vCPU's index
    movl w0, PSCI_CPU_ON64
    firmware_call
    add x11, x11, #1
    b 1b
2:  mov x11, #1                         // wait for every secondary to check in
3:  cmp x11, x15
    b.hs 4f
    ldr_slot w12, ready, x11, x13
    cbz w12, 3b
    add x11, x11, #1
    b 3b
4:  adr x12, go
    mov w13, #1
    str w13, [x12]
    mov x14, #0
    bl timed_loop
    mov x11, #1                         // wait for every secondary's report
5:  cmp x11, x15
    b.hs 6f
    ldr_slot w12, done, x11, x13
    cbz w12, 5b
    add x11, x11, #1
    b 5b
6:  system_off

secondary_entry:                        // x0: the vCPU's index (CPU_ON's context ID)
    mov x14, x0
    adr x12, calls
    ldr x9, [x12]
    ldr x10, [x12, #8]
    mov w12, #1
    str_slot w12, ready, x14, x13
    adr x12, go
1:  ldr w13, [x12]
    cbz w13, 1b
    bl timed_loop
    mov w12, #1
    str_slot w12, done, x14, x13
    movl w0, PSCI_CPU_OFF
    firmware_call
    b .

// x9 calls of x10 from this vCPU (x14: its index), then report (index, start, end, calls, x0, counter frequency)
timed_loop:
    mov x12, x9
    isb
    mrs x13, cntvct_el0
1:  mov x0, x10
    firmware_call
    subs x12, x12, #1
    b.ne 1b
    isb
    mrs x3, cntvct_el0
    mov x5, x0
    mov x1, x14
    mov x2, x13
    mov x4, x9
    mrs x6, cntfrq_el0
    report
    ret

    .balign 8
calls:    .quad 0, 0                    // x9 and x10 for the secondaries
go:       .word 0
ready:    .word 0, 0, 0, 0, 0, 0, 0, 0
done:     .word 0, 0, 0, 0, 0, 0, 0, 0

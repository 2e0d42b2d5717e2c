// Concurrent CPU_ON on 4 vCPUs, round after round (x9 = rounds, set by the test).
// Round r: the target T = 1 + r % 3 powers itself off (CPU_OFF), then cpu0 and the two other
// secondaries call CPU_ON(T, secondary, context r) at the same moment, and each then asks
// AFFINITY_INFO(T). The atomic rule (PSCI 1.1 §5.6, as KVM's in-kernel PSCI keeps it): exactly one
// caller gets SUCCESS, every other gets ALREADY_ON, and every AFFINITY_INFO afterwards says ON.
// Reports:  1 (rounds, SUCCESS answers, ALREADY_ON answers, other answers, rounds without
//              exactly one SUCCESS, AFFINITY_INFO answers other than ON)
//           2 (round, caller, CPU_ON answer, AFFINITY_INFO answer): each answer breaking the rule
    .include "pyvmm.inc"
    .equ BOOTED, 0x10000                // booted[i] = BOOTED | the context ID of i's last boot
    .text
    .global _start
_start:
    mov x28, x9                         // rounds
    mov x19, #0                         // this vCPU's index
    mov x20, #1                         // bring up cpu1..3 (context 0)
1:  adr x21, secondary
    psci PSCI_CPU_ON64, x20, x21, xzr
    add x20, x20, #1
    cmp x20, #4
    b.ne 1b
    mov x20, #1
2:  mov x22, #0
    bl wait_booted
    add x20, x20, #1
    cmp x20, #4
    b.ne 2b

    mov x14, #0                         // SUCCESS answers
    mov x15, #0                         // ALREADY_ON answers
    mov x16, #0                         // any other answer
    mov x17, #0                         // AFFINITY_INFO answers other than ON
    mov x12, #0                         // rounds without exactly one SUCCESS
    mov x26, #1                         // the round
round:
    bl target_of_round                  // x20 = T
    str_slot w26, off_req, x20
3:  psci PSCI_AFFINITY_INFO64, x20      // wait until T is OFF
    cmp x0, #1
    b.ne 3b
    dmb sy
    adr x1, go
    str w26, [x1]                       // the two other secondaries race now, and so does cpu0
    bl race

    mov x13, #0                         // this round's SUCCESS answers
    mov x23, #0                         // each caller: wait for its answers, then count them
4:  bl target_of_round
    cmp x23, x20
    b.eq 7f
5:  ldr_slot w1, stamp, x23
    cmp w1, w26
    b.ne 5b
    dmb sy
    ldr_slot w24, res, x23
    sxtw x24, w24
    ldr_slot w25, aff, x23
    sxtw x25, w25
    cbnz x24, 6f
    add x14, x14, #1
    add x13, x13, #1
    b 8f
6:  cmn x24, #4                         // ALREADY_ON
    b.ne 9f
    add x15, x15, #1
8:  cbz x25, 7f                         // AFFINITY_INFO: ON
    add x17, x17, #1
    b 10f
9:  add x16, x16, #1
10: mov x2, x26                         // report the answers breaking the rule
    mov x3, x23
    mov x4, x24
    mov x5, x25
    mov x1, #2
    report
7:  add x23, x23, #1
    cmp x23, #4
    b.ne 4b
    cmp x13, #1
    b.eq 11f
    add x12, x12, #1
11: bl target_of_round                  // T boots at its entry with x0 = r before the next round
    mov x22, x26
    bl wait_booted
    add x26, x26, #1
    cmp x26, x28
    b.ls round

    mov x2, x28
    mov x3, x14
    mov x4, x15
    mov x5, x16
    mov x6, x12
    mov x1, #1
    report
    mov x2, x17                         // AFFINITY_INFO answers other than ON
    mov x1, #3
    report
    system_off

// x20 <- 1 + x26 % 3
target_of_round:
    mov x1, #3
    udiv x2, x26, x1
    msub x20, x2, x1, x26
    add x20, x20, #1
    ret

// Wait until cpu<x20> has booted with context x22.
wait_booted:
    orr x22, x22, #BOOTED
1:  ldr_slot w1, booted, x20
    cmp x1, x22
    b.ne 1b
    dmb sy
    ret

// The caller's side of round x26 on cpu<x19>: CPU_ON(T), then AFFINITY_INFO(T), both answers
// stored for cpu0, then the stamp saying they are there.
race:
    mov x27, x30
    bl target_of_round
    adr x21, secondary
    psci PSCI_CPU_ON64, x20, x21, x26
    mov x24, x0
    psci PSCI_AFFINITY_INFO64, x20
    str_slot w24, res, x19
    str_slot w0, aff, x19
    dmb sy
    str_slot w26, stamp, x19
    mov x30, x27
    ret

// Secondaries enter with x0 = the round they were powered on in (0 at bring-up). They race in
// every later round and power off when cpu0 asks.
secondary:
    mrs x19, mpidr_el1
    and x19, x19, #0xff
    mov x26, x0                         // the last round this vCPU took part in
    orr w1, w26, #BOOTED
    dmb sy
    str_slot w1, booted, x19
1:  adr x1, go
    ldr w1, [x1]
    cmp w1, w26
    b.eq 2f
    mov w26, w1
    bl race
2:  ldr_slot w1, off_req, x19
    cbz w1, 1b
    str_slot wzr, off_req, x19
    dmb sy
    psci PSCI_CPU_OFF
    b .

    .balign 8
go:      .word 0
off_req: .word 0, 0, 0, 0
res:     .word 0, 0, 0, 0
aff:     .word 0, 0, 0, 0
stamp:   .word 0, 0, 0, 0
booted:  .word 0, 0, 0, 0

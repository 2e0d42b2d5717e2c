// SDEI 1.1 on one vCPU. The test declares events 100 (private, critical), 101 (private, normal)
// and 200 (shared). Reports:
//   1 VERSION, FEATURES(BIND_SLOTS), FEATURES(RELATIVE_MODE)
//   2-4 error codes before anything is registered (five each)
//   5 event 0 handler's x0-x3 and the address SIGNAL returns to
//   6 handler's DAIF, CurrentEL, SPSel, CONTEXT(0), CONTEXT(4)
//   7 CONTEXT(17), STATUS in the handler, x4-x17 clobber mask after COMPLETE, x0, STATUS after
//   8 COMPLETE_AND_RESUME: ELR_EL1, SPSR_EL1, DAIF, CurrentEL at the resume address, SIGNAL's return
//   9 UNREGISTER, PE_MASK, handler runs while masked, PE_MASK again, handler runs after PE_UNMASK
//  10 (from the normal handler: the test raises critical event 100 now)
//  11 critical handler: x0, interrupted PC, the PC it should be, STATUS(0), STATUS(100)
//  12 normal handler: critical ran first, UNREGISTER(0) while running, STATUS(0), STATUS(0) after
//  13 (IRQs masked, about to spin: the test raises event 101 from another thread)
//  14 handler of 101: x0, interrupted PC, interrupted PSTATE, spin loop start and end
//  15 bound UART interrupt: BIND, REGISTER, handler runs, UNREGISTER, RELEASE
//  16 bound event handler: x0, interrupted PC, the PC after the UART write
//  17 shared event states: ROUTING_SET enabled, REGISTER twice, GET_INFO routing, PRIVATE_RESET, SHARED_RESET
    .include "pyvmm.inc"
    .equ UART_BASE, 0x1000000
    .equ UART_INTID, 32                 // the UART's SPI 0
    .text
    .global _start
_start:
    sdei SDEI_VERSION
    mov x21, x0
    sdei1 SDEI_FEATURES, 0
    mov x22, x0
    sdei1 SDEI_FEATURES, 1
    mov x4, x0
    mov x2, x21
    mov x3, x22
    mov x1, #1
    report

    sdei_register 7, handler_a          // no such event
    mov x21, x0
    mov x1, #0
    adr x2, handler_a
    add x2, x2, #2                      // misaligned entry point
    sdei SDEI_EVENT_REGISTER
    mov x22, x0
    sdei1 SDEI_EVENT_ENABLE, 0          // not registered
    mov x23, x0
    sdei1 SDEI_EVENT_CONTEXT, 0         // no handler running
    mov x24, x0
    sdei1 SDEI_EVENT_COMPLETE, 0
    mov x6, x0
    mov x2, x21
    mov x3, x22
    mov x4, x23
    mov x5, x24
    mov x1, #2
    report

    mov x1, #5
    mrs x2, mpidr_el1
    sdei SDEI_EVENT_SIGNAL              // only event 0 can be signalled
    mov x21, x0
    sdei1 SDEI_INTERRUPT_BIND, 3        // an SGI
    mov x22, x0
    sdei1 SDEI_INTERRUPT_BIND, 27       // a PPI: no private slots
    mov x23, x0
    sdei1 SDEI_FEATURES, 9
    mov x24, x0
    sdei1 SDEI_EVENT_UNREGISTER, 0      // not registered
    mov x6, x0
    mov x2, x21
    mov x3, x22
    mov x4, x23
    mov x5, x24
    mov x1, #3
    report

    mov x1, #0
    sdei SDEI_EVENT_ROUTING_SET         // a private event has no routing
    mov x21, x0
    sdei1 SDEI_INTERRUPT_RELEASE, 0     // not a bound event
    mov x22, x0
    mov x1, #0
    mov x2, #9
    sdei SDEI_EVENT_GET_INFO            // no such info
    mov x23, x0
    sdei1 SDEI_EVENT_STATUS, 99
    mov x24, x0
    sdei_register 200, handler_a, 0, 1, 0x55    // route to a PE that does not exist
    mov x6, x0
    mov x2, x21
    mov x3, x22
    mov x4, x23
    mov x5, x24
    mov x1, #4
    report

    // --- dispatch and COMPLETE -------------------------------------------------------------
    sdei_register 0, handler_a, 0xA4A4
    sdei1 SDEI_EVENT_ENABLE, 0
    sdei SDEI_PE_UNMASK
    fill_x4_x17
    mov x1, #0
    mrs x2, mpidr_el1
    movl w0, SDEI_EVENT_SIGNAL
    firmware_call
signal_return:
    mov x25, x0
    check_x4_x17
    sdei1 SDEI_EVENT_STATUS, 0
    mov x26, x0
    adr x9, slots_a
    ldp x2, x3, [x9]
    ldp x4, x5, [x9, #16]
    adr x6, signal_return
    mov x1, #5
    report
    adr x9, slots_a
    ldp x2, x3, [x9, #32]
    ldp x4, x5, [x9, #48]
    ldr x6, [x9, #64]
    mov x1, #6
    report
    adr x9, slots_a
    ldp x2, x3, [x9, #72]
    mov x4, x22
    mov x5, x25
    mov x6, x26
    mov x1, #7
    report

    // --- COMPLETE_AND_RESUME ---------------------------------------------------------------
    sdei1 SDEI_EVENT_UNREGISTER, 0
    sdei_register 0, handler_b
    sdei1 SDEI_EVENT_ENABLE, 0
    mov x1, #0
    mrs x2, mpidr_el1
    movl w0, SDEI_EVENT_SIGNAL
    firmware_call
signal_return_b:
    movz x1, #0xbad
    report
    b .
resumed:
    mrs x2, elr_el1
    mrs x3, spsr_el1
    mrs x4, daif
    mrs x5, currentel
    adr x6, signal_return_b
    mov x1, #8
    report

    // --- PE_MASK defers, PE_UNMASK delivers ----------------------------------------------------
    sdei1 SDEI_EVENT_UNREGISTER, 0
    mov x26, x0
    sdei_register 0, handler_count
    sdei1 SDEI_EVENT_ENABLE, 0
    sdei SDEI_PE_MASK
    mov x21, x0
    mov x1, #0
    mrs x2, mpidr_el1
    sdei SDEI_EVENT_SIGNAL
    adr x9, counter
    ldr x22, [x9]
    sdei SDEI_PE_MASK
    mov x23, x0
    sdei SDEI_PE_UNMASK
    adr x9, counter
    ldr x6, [x9]
    mov x2, x26
    mov x3, x21
    mov x4, x22
    mov x5, x23
    mov x1, #9
    report

    // --- a critical event preempts a running normal handler ------------------------------------
    sdei1 SDEI_EVENT_UNREGISTER, 0
    sdei_register 0, handler_norm
    sdei1 SDEI_EVENT_ENABLE, 0
    sdei_register 100, handler_crit
    sdei1 SDEI_EVENT_ENABLE, 100
    mov x1, #0
    mrs x2, mpidr_el1
    sdei SDEI_EVENT_SIGNAL
    sdei1 SDEI_EVENT_STATUS, 0
    mov x24, x0
    adr x9, slots_c
    ldp x2, x3, [x9]
    adr x4, in_normal
    ldp x5, x6, [x9, #16]
    mov x1, #11
    report
    adr x9, slots_n
    ldp x2, x3, [x9]
    ldr x4, [x9, #16]
    mov x5, x24
    mov x1, #12
    report

    // --- a host-raised event while IRQs are masked and the guest never exits ---------------
    sdei_register 101, handler_host
    sdei1 SDEI_EVENT_ENABLE, 101
    msr daifset, #0xf
    mov x1, #13
    report
    adr x9, host_flag
spin_start:
    ldr x10, [x9]
    cbz x10, spin_start
spin_end:
    adr x9, slots_h
    ldp x2, x3, [x9]
    ldr x4, [x9, #16]
    adr x5, spin_start
    adr x6, spin_end
    mov x1, #14
    report

    // --- a device interrupt bound to an SDEI event ---------------------------------------------
    sdei1 SDEI_INTERRUPT_BIND, UART_INTID
    mov x21, x0
    mov x1, x21
    adr x2, handler_irq
    mov x3, #0
    mov x4, #0
    mov x5, #0
    sdei SDEI_EVENT_REGISTER
    mov x22, x0
    mov x1, x21
    sdei SDEI_EVENT_ENABLE
    movl x9, UART_BASE
    mov w10, #2
    strb w10, [x9, #1]                  // IER = THRI: the empty transmitter raises the line
after_ier:
    adr x9, slots_i
    ldr x23, [x9, #16]
    mov x1, x21
    sdei SDEI_EVENT_UNREGISTER
    mov x24, x0
    mov x1, x21
    sdei SDEI_INTERRUPT_RELEASE
    mov x6, x0
    mov x2, x21
    mov x3, x22
    mov x4, x23
    mov x5, x24
    mov x1, #15
    report
    adr x9, slots_i
    ldp x2, x3, [x9]
    adr x4, after_ier
    mov x1, #16
    report

    // --- shared event states ---------------------------------------------------------------
    sdei_register 200, handler_a
    sdei1 SDEI_EVENT_ENABLE, 200
    mov x1, #200
    mov x2, #0
    mov x3, #0
    sdei SDEI_EVENT_ROUTING_SET         // not while enabled
    mov x21, x0
    sdei_register 200, handler_a        // registered already
    mov x22, x0
    mov x1, #200
    mov x2, #3
    sdei SDEI_EVENT_GET_INFO            // routing mode: any PE
    mov x23, x0
    sdei SDEI_PRIVATE_RESET
    mov x24, x0
    sdei SDEI_SHARED_RESET
    mov x6, x0
    mov x2, x21
    mov x3, x22
    mov x4, x23
    mov x5, x24
    mov x1, #17
    report
    system_off

// --- handlers (entered at EL1h, DAIF masked; x0 event, x1 argument, x2 PC, x3 PSTATE) -----------
handler_a:
    adr x9, slots_a
    stp x0, x1, [x9]
    stp x2, x3, [x9, #16]
    mrs x10, daif
    mrs x11, currentel
    mrs x12, spsel
    stp x10, x11, [x9, #32]
    str x12, [x9, #48]
    sdei1 SDEI_EVENT_CONTEXT, 0
    str x0, [x9, #56]
    sdei1 SDEI_EVENT_CONTEXT, 4
    str x0, [x9, #64]
    sdei1 SDEI_EVENT_CONTEXT, 17
    str x0, [x9, #72]
    sdei1 SDEI_EVENT_STATUS, 0
    str x0, [x9, #80]
    sdei1 SDEI_EVENT_COMPLETE, 0
    b .

handler_b:
    adr x1, resumed
    sdei SDEI_EVENT_COMPLETE_AND_RESUME
    b .

handler_count:
    adr x9, counter
    ldr x10, [x9]
    add x10, x10, #1
    str x10, [x9]
    sdei1 SDEI_EVENT_COMPLETE, 0
    b .

handler_norm:
    mov x1, #10
    report                              // the test raises critical event 100 during this call
in_normal:
    adr x9, crit_done
    ldr x21, [x9]
    sdei1 SDEI_EVENT_UNREGISTER, 0
    mov x22, x0
    sdei1 SDEI_EVENT_STATUS, 0
    adr x9, slots_n
    stp x21, x22, [x9]
    str x0, [x9, #16]
    sdei1 SDEI_EVENT_COMPLETE, 0
    b .

handler_crit:
    adr x9, slots_c
    stp x0, x2, [x9]
    sdei1 SDEI_EVENT_STATUS, 0
    str x0, [x9, #16]
    sdei1 SDEI_EVENT_STATUS, 100
    str x0, [x9, #24]
    mov x10, #1
    adr x9, crit_done
    str x10, [x9]
    sdei1 SDEI_EVENT_COMPLETE, 0
    b .

handler_host:
    adr x9, slots_h
    str x0, [x9]
    stp x2, x3, [x9, #8]
    mov x10, #1
    adr x9, host_flag
    str x10, [x9]
    sdei1 SDEI_EVENT_COMPLETE, 0
    b .

handler_irq:
    adr x9, slots_i
    stp x0, x2, [x9]
    movl x10, UART_BASE
    strb wzr, [x10, #1]                 // IER = 0: the line drops
    ldr x11, [x9, #16]
    add x11, x11, #1
    str x11, [x9, #16]
    sdei1 SDEI_EVENT_COMPLETE, 0
    b .

    .balign 8
slots_a: .fill 12, 8, 0
slots_c: .fill 4, 8, 0
slots_n: .fill 4, 8, 0
slots_h: .fill 4, 8, 0
slots_i: .fill 4, 8, 0
counter: .quad 0
crit_done: .quad 0
host_flag: .quad 0

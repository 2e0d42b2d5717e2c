// A hostile virtio driver against a vhost-vsock device at 0x3000000 (virtio-mmio version 2): the
// kernel, not pyvmm, walks its rx (0) and tx (1) rings. It sets both up (virtio 1.2 §3.1.1), then
// makes available a transmit chain that loops (0 -> 1 -> 0): vhost-vsock refuses the chain and
// stops the ring; pyvmm and the guest go on. After a device reset (which takes the rings back from
// the kernel), a well-formed connection request (§5.10.6.3) to the host's port PORT must be
// answered on the receive ring; then a machine reset (PSCI SYSTEM_RESET), after which the second
// boot makes the same request from the next port. Reports (x1..x3):
//   1: status after the set-up (ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK), the guest CID its
//      configuration space holds, 0
//   2: used index of the tx ring after the looping chain had its time, 0, 0
//   3: status after the reset, 0, 0
//   4: rx used index, rx used length, the answer's op (§5.10.6: 2 RESPONSE, 3 RST)
//   (boot 2) 4 again, then SYSTEM_OFF
    .include "pyvmm.inc"
    .include "virtio_mmio.inc"

    .equ SPINS, 0x40000000                 // memory polls
    .equ CONFIG, 0x100
    .equ VRING_DESC_F_NEXT, 1
    .equ VRING_DESC_F_WRITE, 2
    .equ HOST_CID, 2
    .equ PORT, 5003
    .equ GUEST_PORT, 1234
    .equ HDR, 44                           // struct virtio_vsock_hdr (§5.10.6)
    .equ TX_BUF, BUF + 0x1000
    .equ VIRTIO_VSOCK_TYPE_STREAM, 1
    .equ VIRTIO_VSOCK_OP_REQUEST, 1

    .text
    .global _start
_start:
    count_boot                              // w20: this boot's number
    mov w22, w20
    movl x20, VIRTIO
    cmp w22, #1
    b.ne request                            // the second boot: straight to a connection
    bl setup
    ldr w1, [x20, #STATUS]
    ldr x21, [x20, #CONFIG]                // guest_cid, le64 (§5.10.4)
    mov x2, x21
    mov x3, #0
    report

    // a loop on the transmit ring: 0 -> 1 -> 0, both readable
    desc 0, TX_BUF, HDR, VRING_DESC_F_NEXT, 1, DESC1
    desc 1, TX_BUF, HDR, VRING_DESC_F_NEXT, 0, DESC1
    bl make_available1
    report_used_after USED1, SPINS / 4      // time for the kernel to meet the loop
    reset_and_report                        // vhost-vsock gives the rings back

    // a receive buffer for the answer, then the request: its header alone, from this guest's CID
request:
    bl setup
    ldr x21, [x20, #CONFIG]
    desc 0, BUF, 4096, VRING_DESC_F_WRITE, 0
    bl make_available
    movl x9, TX_BUF
    str x21, [x9]                           // src_cid
    mov x10, #HOST_CID
    str x10, [x9, #8]                       // dst_cid
    movl w10, GUEST_PORT - 1
    add w10, w10, w22                       // a port of this boot's own: the last one's connection may linger
    str w10, [x9, #16]                      // src_port
    movl w10, PORT
    str w10, [x9, #20]                      // dst_port
    str wzr, [x9, #24]                      // len: no payload
    mov w10, #VIRTIO_VSOCK_TYPE_STREAM
    strh w10, [x9, #28]
    mov w10, #VIRTIO_VSOCK_OP_REQUEST
    strh w10, [x9, #30]
    str wzr, [x9, #32]                      // flags
    movl w10, 0x10000
    str w10, [x9, #36]                      // buf_alloc
    str wzr, [x9, #40]                      // fwd_cnt
    desc 0, TX_BUF, HDR, 0, 0, DESC1
    bl make_available1
    wait_used USED, SPINS
    movl x9, BUF
    ldrh w3, [x9, #30]                      // the answer's op
    report
    cmp w22, #1
    b.ne 4f
    psci PSCI_SYSTEM_RESET                  // the machine's reset: pyvmm stops the rings and starts them anew
4:  system_off

    virtio_functions 2

    .ltorg

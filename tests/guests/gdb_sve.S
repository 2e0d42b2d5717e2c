// A guest for the GDB stub's SVE test (tests/kvm/test_gdb.py), with an ELF file beside its
// build in the payload cache for its symbols. vCPU 0 turns SVE on at the longest vector length,
// gives Z0, Z1, P0 and FFR known values and reaches `sve_set`, where GDB reads them and writes
// the last 64-bit lane of Z2 and the first byte of P3; at `sve_checked` x1 holds that lane as
// the guest reads it (LASTB) and x2 the number of P3's bits set (CNTP). Without SVE it goes
// straight to `no_sve`. Then it powers off.
    .include "pyvmm.inc"
    .arch armv8.2-a+sve

    .text
    .global _start
_start:
    mrs x9, id_aa64pfr0_el1
    ubfx x9, x9, #32, #4                // ID_AA64PFR0_EL1.SVE
    cbz x9, no_sve
    sve_on
    index z0.d, #1, #1                  // z0.d = 1, 2, 3, ... up to VG
    dup z1.b, #0x5a
    dup z2.b, #0
    ptrue p0.d                          // bit 0 of each 8: the byte 0x01 throughout
    pfalse p3.b
    setffr                              // every FFR bit
    rdvl x19, #1                        // the vector length in bytes
sve_set:
    nop
    lastb x1, p0, z2.d                  // the last 64-bit lane, past V2's 128 bits when VL > 128
    ptrue p4.b
    cntp x2, p4, p3.b
sve_checked:
    nop
no_sve:
    system_off

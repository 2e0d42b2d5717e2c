"""AArch64 registers as GDB numbers them, and the target description that tells GDB so
(GDB manual, "Target Descriptions" and "AArch64 Features"). `g` and `G` carry them all in this
order, each little-endian, as hex.

Which registers there are depends on the vCPU. Without SVE they are the features
org.gnu.gdb.aarch64.core and org.gnu.gdb.aarch64.fpu (V0-V31, FPSR, FPCR). With SVE the fpu
feature gives way to org.gnu.gdb.aarch64.sve: Z0-Z31 as wide as the vector length, FPSR, FPCR,
P0-P15 and FFR (one bit per byte of a Z register) and VG (the vector length in 64-bit granules);
GDB derives V0-V31 from the Z registers itself. The register numbers are the same either way
up to FPCR's, which is what GDB's aarch64 support expects of a remote target.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Register:
    name: str
    bits: int
    kind: str  # the description's type


CORE = ([Register(f"x{i}", 64, "int") for i in range(31)]
        + [Register("sp", 64, "data_ptr"), Register("pc", 64, "code_ptr"), Register("cpsr", 32, "uint32")])
FP_CONTROL = [Register("fpsr", 32, "uint32"), Register("fpcr", 32, "uint32")]
FPU = [Register(f"v{i}", 128, "uint128") for i in range(32)] + FP_CONTROL
PC, SP, CPSR = 32, 31, 33  # the same in every layout
FIRST_VECTOR = len(CORE)  # v0, or z0


def _sve(vq: int) -> list[Register]:
    """The SVE feature's registers for a vector length of `vq` 128-bit quadwords."""
    z = [Register(f"z{i}", 128 * vq, "svev") for i in range(32)]
    p = [Register(f"p{i}", 16 * vq, "svep") for i in range(16)] + [Register("ffr", 16 * vq, "svep")]
    return z + FP_CONTROL + p + [Register("vg", 64, "int")]


def _sve_types(vq: int) -> list[str]:
    """The union type GDB shows a Z register as (z0.d.u[1], z0.b.s[3], ...): each element size's
    vectors, then the predicate type, named as GDB names them when it describes an SVE target
    itself (gdb/features/aarch64-sve.c)."""
    elements = {"q": [("u", "uint128"), ("s", "int128")],
                "d": [("f", "ieee_double"), ("u", "uint64"), ("s", "int64")],
                "s": [("f", "ieee_single"), ("u", "uint32"), ("s", "int32")],
                "h": [("f", "ieee_half"), ("u", "uint16"), ("s", "int16")],
                "b": [("u", "uint8"), ("s", "int8")]}
    count = {"q": vq, "d": 2 * vq, "s": 4 * vq, "h": 8 * vq, "b": 16 * vq}
    lines = []
    for size, fields in elements.items():
        for sign, kind in fields:
            lines.append(f'    <vector id="svev{size}{sign}" type="{kind}" count="{count[size]}"/>')
        lines.append(f'    <union id="svevn{size}">')
        lines += [f'      <field name="{sign}" type="svev{size}{sign}"/>' for sign, _ in fields]
        lines.append("    </union>")
    lines.append('    <union id="svev">')
    lines += [f'      <field name="{size}" type="svevn{size}"/>' for size in elements]
    lines.append("    </union>")
    lines.append(f'    <vector id="svep" type="uint8" count="{2 * vq}"/>')
    return lines


def _feature(name: str, regs: list[Register], first: int, types: list[str] | None = None) -> list[str]:
    lines = [f'  <feature name="{name}">', *(types or [])]
    lines += [f'    <reg name="{r.name}" bitsize="{r.bits}" type="{r.kind}" regnum="{first + i}"/>'
              for i, r in enumerate(regs)]
    return [*lines, "  </feature>"]


@dataclass(frozen=True)
class Layout:
    """The registers of one kind of vCPU, in GDB's order, and the description that says so."""

    registers: tuple[Register, ...]
    target_xml: bytes
    vq: int = 0  # the SVE vector length in quadwords; 0 without SVE
    number: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "number", {r.name: i for i, r in enumerate(self.registers)})

    def encode(self, number: int, value: int) -> bytes:
        """One register's value as GDB wants it: its bytes, little-endian, in hex."""
        size = self.registers[number].bits // 8
        return (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little").hex().encode()

    def decode(self, number: int, text: bytes) -> int:
        """The value GDB sent for one register; ValueError if it is not exactly that many bytes."""
        raw = bytes.fromhex(text.decode("ascii"))
        r = self.registers[number]
        if len(raw) != r.bits // 8:
            raise ValueError(f"{r.name} takes {r.bits // 8} bytes, not {len(raw)}")
        return int.from_bytes(raw, "little")

    def encode_all(self, values: list[int]) -> bytes:
        return b"".join(self.encode(i, v) for i, v in enumerate(values))

    def decode_all(self, text: bytes) -> list[int]:
        """Every register from a `G` packet's hex."""
        values, pos = [], 0
        for i, r in enumerate(self.registers):
            n = r.bits // 4
            values.append(self.decode(i, text[pos:pos + n]))
            pos += n
        if pos != len(text):
            raise ValueError(f"G carries {len(text)} hex digits, the registers take {pos}")
        return values


def _describe(features: list[list[str]]) -> bytes:
    head = ['<?xml version="1.0"?>', '<!DOCTYPE target SYSTEM "gdb-target.dtd">', '<target version="1.0">',
            "  <architecture>aarch64</architecture>"]
    return "\n".join([*head, *(line for f in features for line in f), "</target>", ""]).encode()


FPSIMD = Layout(tuple(CORE + FPU), _describe([_feature("org.gnu.gdb.aarch64.core", CORE, 0),
                                              _feature("org.gnu.gdb.aarch64.fpu", FPU, len(CORE))]))


def sve(vq: int) -> Layout:
    """The layout of a vCPU with SVE vectors of `vq` x 128 bits."""
    regs = _sve(vq)
    xml = _describe([_feature("org.gnu.gdb.aarch64.core", CORE, 0),
                     _feature("org.gnu.gdb.aarch64.sve", regs, len(CORE), _sve_types(vq))])
    return Layout(tuple(CORE + regs), xml, vq)

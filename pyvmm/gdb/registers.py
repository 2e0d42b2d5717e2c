"""AArch64 registers as GDB numbers them, and the target description that tells GDB so
(GDB manual, "Target Descriptions"; the features GDB's aarch64 support looks for by name:
org.gnu.gdb.aarch64.core and org.gnu.gdb.aarch64.fpu, gdb/features/aarch64-core.xml and
aarch64-fpu.xml). `g` and `G` carry them all in this order, each little-endian, as hex."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Register:
    name: str
    bits: int
    kind: str  # the description's type


CORE = ([Register(f"x{i}", 64, "int") for i in range(31)]
        + [Register("sp", 64, "data_ptr"), Register("pc", 64, "code_ptr"), Register("cpsr", 32, "uint32")])
FPU = [Register(f"v{i}", 128, "uint128") for i in range(32)] + [Register("fpsr", 32, "uint32"),
                                                                Register("fpcr", 32, "uint32")]
REGISTERS = CORE + FPU
NUMBER = {r.name: i for i, r in enumerate(REGISTERS)}
PC, SP, CPSR = NUMBER["pc"], NUMBER["sp"], NUMBER["cpsr"]


def _feature(name: str, regs: list[Register], first: int) -> str:
    lines = [f'  <feature name="{name}">']
    lines += [f'    <reg name="{r.name}" bitsize="{r.bits}" type="{r.kind}" regnum="{first + i}"/>'
              for i, r in enumerate(regs)]
    return "\n".join([*lines, "  </feature>"])


TARGET_XML = "\n".join([
    '<?xml version="1.0"?>',
    '<!DOCTYPE target SYSTEM "gdb-target.dtd">',
    '<target version="1.0">',
    "  <architecture>aarch64</architecture>",
    _feature("org.gnu.gdb.aarch64.core", CORE, 0),
    _feature("org.gnu.gdb.aarch64.fpu", FPU, len(CORE)),
    "</target>",
    "",
]).encode()


def encode(number: int, value: int) -> bytes:
    """One register's value as GDB wants it: its bytes, little-endian, in hex."""
    size = REGISTERS[number].bits // 8
    return (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little").hex().encode()


def decode(number: int, text: bytes) -> int:
    """The value GDB sent for one register; ValueError if it is not exactly that many bytes."""
    raw = bytes.fromhex(text.decode("ascii"))
    if len(raw) != REGISTERS[number].bits // 8:
        raise ValueError(f"{REGISTERS[number].name} takes {REGISTERS[number].bits // 8} bytes, not {len(raw)}")
    return int.from_bytes(raw, "little")


def encode_all(values: list[int]) -> bytes:
    return b"".join(encode(i, v) for i, v in enumerate(values))


def decode_all(text: bytes) -> list[int]:
    """Every register from a `G` packet's hex."""
    values, pos = [], 0
    for i, r in enumerate(REGISTERS):
        n = r.bits // 4
        values.append(decode(i, text[pos:pos + n]))
        pos += n
    if pos != len(text):
        raise ValueError(f"G carries {len(text)} hex digits, the registers take {pos}")
    return values

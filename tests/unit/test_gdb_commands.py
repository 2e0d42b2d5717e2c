"""The inspection packets (registers, memory, threads, the target description) against a fake
target, as GDB sends them."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from pyvmm.gdb import registers as regs
from pyvmm.gdb.commands import Inspector, MemoryFault
from pyvmm.gdb.registers import FPSIMD


class FakeTarget:
    def __init__(self, cpus: int = 2, layout: regs.Layout = regs.FPSIMD) -> None:
        self.layout = layout
        self.regs = [[(cpu << 32) | i for i in range(len(layout.registers))] for cpu in range(cpus)]
        self.memory = {0xFFFF_0000_0000_1000 + i: i & 0xFF for i in range(0x1000)}

    def vcpus(self) -> int:
        return len(self.regs)

    def read_registers(self, cpu: int) -> list[int]:
        return list(self.regs[cpu])

    def write_register(self, cpu: int, number: int, value: int) -> None:
        self.regs[cpu][number] = value

    def read_memory(self, cpu: int, address: int, length: int) -> bytes:
        try:
            return bytes(self.memory[a] for a in range(address, address + length))
        except KeyError:
            raise MemoryFault(hex(address)) from None

    def write_memory(self, cpu: int, address: int, data: bytes) -> None:
        if any(a not in self.memory for a in range(address, address + len(data))):
            raise MemoryFault(hex(address))
        for i, b in enumerate(data):
            self.memory[address + i] = b


@pytest.fixture
def stub() -> Inspector:
    return Inspector(FakeTarget())


def description(stub: Inspector) -> dict[str | None, list[ET.Element]]:
    """The target description GDB reads, in 0x100-byte pieces: each feature's elements."""
    xml, offset = b"", 0
    while True:
        reply = stub.handle(f"qXfer:features:read:target.xml:{offset:x},100".encode())
        xml += reply[1:]
        offset += len(reply) - 1
        if reply[:1] == b"l":
            break
        assert reply[:1] == b"m"
    return {f.get("name"): list(f) for f in ET.fromstring(xml).iter("feature")}


def test_the_target_description_is_what_gdb_looks_for(stub: Inspector) -> None:
    features = {name: [r.get("name") for r in f if r.tag == "reg"] for name, f in description(stub).items()}
    assert features["org.gnu.gdb.aarch64.core"][-3:] == ["sp", "pc", "cpsr"]
    assert features["org.gnu.gdb.aarch64.fpu"][-2:] == ["fpsr", "fpcr"] and len(features["org.gnu.gdb.aarch64.fpu"]) == 34
    assert b"qXfer:features:read+" in stub.handle(b"qSupported:multiprocess+;xmlRegisters=i386")


def test_registers_read_and_write_one_and_all(stub: Inspector) -> None:
    target = stub.target
    assert isinstance(target, FakeTarget)
    g = stub.handle(b"g")
    assert len(g) == sum(r.bits for r in FPSIMD.registers) // 4
    assert FPSIMD.decode_all(g) == [v & ((1 << r.bits) - 1) for v, r in zip(target.regs[0], FPSIMD.registers, strict=True)]
    assert stub.handle(f"p{regs.PC:x}".encode()) == FPSIMD.encode(regs.PC, target.regs[0][regs.PC])
    assert stub.handle(f"P{regs.PC:x}=".encode() + (0x8000_1000).to_bytes(8, "little").hex().encode()) == b"OK"
    assert target.regs[0][regs.PC] == 0x8000_1000
    assert stub.handle(f"P{regs.CPSR:x}=0011".encode()) == b"E16"  # cpsr is 4 bytes, not 2
    assert stub.handle(b"p99") == b"E16"
    values = list(range(len(FPSIMD.registers)))
    assert stub.handle(b"G" + FPSIMD.encode_all(values)) == b"OK" and target.regs[0] == values
    assert stub.handle(b"G00") == b"E16"


def test_with_sve_the_description_sizes_the_registers_to_the_vector() -> None:
    """GDB's org.gnu.gdb.aarch64.sve (GDB manual, "AArch64 Features"): its registers by name, each
    Z register's type the union GDB shows (z0.d.u[1]), sized to this VL; `g` carries them all."""
    stub = Inspector(FakeTarget(layout=regs.sve(4)))  # 512-bit vectors
    sve = description(stub)["org.gnu.gdb.aarch64.sve"]
    registers = {r.get("name"): r for r in sve if r.tag == "reg"}
    assert list(registers) == ([f"z{i}" for i in range(32)] + ["fpsr", "fpcr"] + [f"p{i}" for i in range(16)]
                               + ["ffr", "vg"])
    assert registers["z0"].get("bitsize") == "512" and registers["z0"].get("regnum") == "34"
    assert registers["p15"].get("bitsize") == "64" and registers["vg"].get("regnum") == "85"
    types = {t.get("id"): t for t in sve if t.tag in ("vector", "union")}
    assert types["svevdu"].get("count") == "8" and types["svep"].get("count") == "8"
    assert [f.get("name") for f in types["svev"]] == ["q", "d", "s", "h", "b"]
    assert all(f.get("type") in types for u in types.values() if u.tag == "union" for f in u)
    assert len(stub.handle(b"g")) == (34 * 64 - 32 + 32 * 512 + 2 * 32 + 17 * 64 + 64) // 4
    assert stub.handle(b"P22=" + b"00" * 64) == b"OK" and stub.handle(b"P22=" + b"00" * 16) == b"E16"


def test_threads_are_vcpus(stub: Inspector) -> None:
    target = stub.target
    assert isinstance(target, FakeTarget)
    assert stub.handle(b"qfThreadInfo") == b"m1,2" and stub.handle(b"qsThreadInfo") == b"l"
    assert stub.handle(b"Hg2") == b"OK" and stub.handle(b"qC") == b"QC2"
    assert FPSIMD.decode(regs.PC, stub.handle(f"p{regs.PC:x}".encode())) == target.regs[1][regs.PC]
    assert stub.handle(b"Hg3") == b"E03" and stub.handle(b"T3") == b"E03" and stub.handle(b"T1") == b"OK"
    assert bytes.fromhex(stub.handle(b"qThreadExtraInfo,2").decode()) == b"vCPU 1"
    assert stub.handle(b"Hc-1") == b"OK"


def test_memory_reads_writes_and_faults(stub: Inspector) -> None:
    base = 0xFFFF_0000_0000_1000
    assert stub.handle(f"m{base + 0x10:x},4".encode()) == b"10111213"
    assert stub.handle(f"M{base:x},2:abcd".encode()) == b"OK"
    assert stub.handle(f"m{base:x},2".encode()) == b"abcd"
    assert stub.handle(f"X{base:x},3:".encode() + b"#$}") == b"OK"  # binary, unescaped by the reader
    assert stub.handle(f"m{base:x},3".encode()) == b"23247d"
    assert stub.handle(f"m{base + 0xFFE:x},4".encode()) == b"E0e"  # runs into an unmapped page
    assert stub.handle(b"m0,10") == b"E0e"
    for bad in (b"mzz,1", b"m10", b"M10,2:abc", b"M10,1:abcd", f"m0,{0x4000:x}".encode()):
        assert stub.handle(bad) == b"E16", bad


def test_unknown_packets_are_unsupported_and_stop_reason_names_the_vcpu(stub: Inspector) -> None:
    assert stub.handle(b"vMustReplyEmpty") == b"" and stub.handle(b"qNonsense") == b""
    stub.stopped_cpu = 1
    assert stub.handle(b"?") == b"T05thread:2;"
    assert stub.handle(b"QStartNoAckMode") == b"OK" and stub.no_ack

"""The mach-virt device tree: decompiled by dtc and validated by dt-validate (dtschema)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from devicetree.builder import Node, build_dtb
from devicetree.machvirt import machine_tree
from pyvmm.devices.serial import SerialPort
from pyvmm.devices.virtio.device import VirtioDevice
from pyvmm.devices.virtio.mmio_registers import VIRTIO_MMIO_BASE
from pyvmm.devices.virtio.rng import VirtioRng
from pyvmm.devices.virtio.transport import VirtioMmio
from pyvmm.machine.irq_lines import InterruptLines
from pyvmm.machine.memory import GuestMemory
from pyvmm.services.psci import KvmPsci, Psci
from pyvmm.services.sdei import Sdei
from pyvmm.smccc.service import Service
from tests.dts import decompile, string_lists
from tests.unit.fakes import FakeVmFd, gic_layout, machine

PSCI_COMPATIBLE = ["arm,psci-1.0", "arm,psci-0.2"]  # 0.2 stays: kvm-unit-tests asserts on it


class Board:
    """The parts a VM assembles its tree from, made for real without KVM: the UART on an
    interrupt line, virtio transports on guest RAM, PSCI (and SDEI) on a service context."""

    def __init__(self, cpus: int, gic_version: int = 3, conduit: str = "hvc", sdei: bool = False) -> None:
        self.fake = machine(cpus, all_on=True, conduit=conduit)
        self.gic = gic_layout(cpus, gic_version)
        self.fd = FakeVmFd()
        self.lines = InterruptLines(self.fd)
        self.ram = GuestMemory()
        self.ram.add(0x8000_0000, 1 << 20)
        self.devices: list[SerialPort | VirtioMmio] = [SerialPort(lambda byte: None, self.lines.line())]
        ctx = self.fake.context()
        self.services: list[Service] = [Psci(ctx), *([Sdei(ctx)] if sdei else [])]

    def add_virtio(self, device: VirtioDevice) -> None:
        base = VIRTIO_MMIO_BASE + 0x200 * (len(self.devices) - 1)
        self.devices.append(VirtioMmio(device, base, self.ram, self.lines.irqfd(), self.fd.ioeventfd))

    def dtb(self) -> bytes:
        firmware = [node for s in self.services if (node := s.dt_node()) is not None]
        return build_dtb(machine_tree(cpus=[v.mpidr for v in self.fake.vcpus], memory=[(0x8000_0000, 256 << 20)],
                                      gic=self.gic, devices=self.devices, firmware=firmware,
                                      bootargs="console=ttyS0", initrd=(0x8F00_0000, 0x8F10_0000),
                                      stdout="/uart@1000000"))

    def close(self) -> None:
        for d in self.devices:
            if isinstance(d, VirtioMmio):
                d.close()
        self.lines.close()
        self.ram.close()


def dtb_of(cpus: int, gic_version: int = 3, conduit: str = "hvc", sdei: bool = False,
           virtio: int = 0) -> bytes:
    board = Board(cpus, gic_version, conduit, sdei)
    try:
        for _ in range(virtio):
            board.add_virtio(VirtioRng())
        return board.dtb()
    finally:
        board.close()


@pytest.mark.parametrize(("cpus", "gic", "conduit"), [(1, 3, "hvc"), (4, 3, "smc"), (2, 2, "hvc")])
def test_tree_content(cpus: int, gic: int, conduit: str) -> None:
    dts = decompile(dtb_of(cpus, gic, conduit, sdei=conduit == "smc"))
    assert 'compatible = "linux,dummy-virt";' in dts
    assert dts.count('enable-method = "psci";') == cpus
    assert f"cpu@{cpus - 1:x} {{" in dts
    assert PSCI_COMPATIBLE in string_lists(dts, "compatible") and f'method = "{conduit}";' in dts
    assert ('compatible = "arm,sdei-1.0";' in dts) == (conduit == "smc")
    assert 'device_type = "memory";' in dts and "reg = <0x00 0x80000000 0x00 0x10000000>;" in dts
    assert ('"arm,gic-v3"' if gic == 3 else '"arm,cortex-a15-gic"') in dts
    assert "interrupts = <0x01 0x0d 0x04 0x01 0x0e 0x04 0x01 0x0b 0x04 0x01 0x0a 0x04>;" in dts
    assert 'compatible = "ns16550a";' in dts and "reg = <0x00 0x1000000 0x00 0x08>;" in dts
    assert 'serial0 = "/uart@1000000";' in dts and 'stdout-path = "/uart@1000000";' in dts
    assert "linux,initrd-start = <0x00 0x8f000000>;" in dts and 'bootargs = "console=ttyS0";' in dts


def test_virtio_devices_have_kvmtool_addresses_and_edge_interrupts() -> None:
    dts = decompile(dtb_of(1, virtio=2))
    for base, spi in ((0x3000000, 1), (0x3000200, 2)):
        node = dts[dts.index(f"virtio@{base:x} {{"):]
        node = node[:node.index("};")]
        assert 'compatible = "virtio,mmio";' in node and "dma-coherent;" in node
        assert f"reg = <0x00 {base:#x} 0x00 0x200>;" in node
        assert f"interrupts = <0x00 {spi:#04x} 0x01>;" in node  # SPI, edge rising


def dt_tool(name: str) -> str:
    tool = Path(sys.executable).parent / name
    if tool.exists():
        return str(tool)
    if shutil.which(name) is None:
        pytest.fail(f"{name} is missing: it comes with dtschema (`make venv`)")
    return name


def test_tree_passes_dt_validate(tmp_path: Path) -> None:
    """dtschema's core schemas, plus tests/schemas for the psci, sdei and virtio-mmio nodes
    (whose bindings live in the kernel tree, not in dtschema)."""
    schema = tmp_path / "processed.json"
    with open(schema, "w") as f:
        subprocess.run([dt_tool("dt-mk-schema"), "-j", str(Path(__file__).parents[1] / "schemas")], stdout=f,
                       check=True)

    def validate(dtb: bytes) -> list[str]:
        path = tmp_path / "pyvmm.dtb"
        path.write_bytes(dtb)
        out = subprocess.run([dt_tool("dt-validate"), "-s", str(schema), str(path)], capture_output=True, text=True)
        return [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]

    assert validate(dtb_of(2, sdei=True)) == []
    assert validate(dtb_of(1, virtio=1)) == []
    assert validate(dtb_of(4, conduit="smc")) == []
    bad = dtb_of(1, conduit="svc", sdei=True)  # a conduit the binding does not allow is caught
    assert any("method" in line for line in validate(bad))


# Negative checks: each tests/schemas file rejects pyvmm's tree once one rule of its kernel
# binding is broken in it (so the dt-validate pass above can fail).

@pytest.fixture(scope="module")
def processed_schemas(tmp_path_factory: pytest.TempPathFactory) -> Path:
    schema = tmp_path_factory.mktemp("dtschema") / "processed.json"
    with open(schema, "w") as f:
        subprocess.run([dt_tool("dt-mk-schema"), "-j", str(Path(__file__).parents[1] / "schemas")], stdout=f,
                       check=True)
    return schema


def node_span(dts: str, path: str) -> tuple[int, int]:
    """Where the node at `path` (e.g. "firmware/sdei") is in dtc's decompiled text."""
    start, indent = 0, ""
    for name in path.split("/"):
        indent += "\t"
        start = dts.index(f"\n{indent}{name} {{\n", start)
    return start, dts.index(f"\n{indent}}};", start) + len(indent) + 3


def drop_property(dts: str, path: str, prop: str) -> str:
    start, end = node_span(dts, path)
    node = re.sub(rf"\n\t+{re.escape(prop)} = [^\n]*;", "", dts[start:end], count=1)
    assert node != dts[start:end], f"{path} has no {prop}"
    return dts[:start] + node + dts[end:]


def set_method(dts: str, path: str, value: str) -> str:
    start, end = node_span(dts, path)
    node = re.sub(r'method = "[a-z]+";', f'method = "{value}";', dts[start:end], count=1)
    assert node != dts[start:end], f"{path} has no method"
    return dts[:start] + node + dts[end:]


def move_to_root(dts: str, path: str) -> str:
    start, end = node_span(dts, path)
    node = "\n".join(line[path.count("/"):] for line in dts[start:end].split("\n"))
    rest = dts[:start] + dts[end:]
    return rest[:rest.rindex("\n};")] + node + rest[rest.rindex("\n};"):]


@pytest.mark.parametrize(("schema", "breakage", "expected"), [
    ("psci.yaml", lambda dts: drop_property(dts, "psci", "method"), "'method' is a required property"),
    ("virtio-mmio.yaml", lambda dts: drop_property(dts, "virtio@3000000", "interrupts"),
     "'interrupts' is a required property"),
    ("sdei.yaml", lambda dts: set_method(dts, "firmware/sdei", "svc"), "'svc' is not one of ['smc', 'hvc']"),
    ("sdei-placement.yaml", lambda dts: move_to_root(dts, "firmware/sdei"), "should not be valid under"),
], ids=["psci-without-method", "virtio-mmio-without-interrupts", "sdei-method-svc", "sdei-outside-firmware"])
def test_schemas_reject_a_tree_that_breaks_the_binding(processed_schemas: Path, tmp_path: Path, schema: str,
                                                       breakage: Callable[[str], str], expected: str) -> None:
    dts = decompile(dtb_of(1, sdei=True, virtio=1))

    def validate(source: str) -> str:
        subprocess.run(["dtc", "-I", "dts", "-O", "dtb", "-q", "-o", str(tmp_path / "t.dtb")], input=source.encode(),
                       check=True)
        out = subprocess.run([dt_tool("dt-validate"), "-s", str(processed_schemas), str(tmp_path / "t.dtb")],
                             capture_output=True, text=True)
        return out.stdout + out.stderr

    assert validate(dts).strip() == ""  # the tree as generated passes
    report = validate(breakage(dts))
    assert expected in report and f"http://devicetree.org/schemas/{schema}" in report, report


class VendorFirmware(Service):
    """A service of someone's own that the guest finds through the device tree."""

    name = "vendor firmware"

    def dt_node(self) -> tuple[str, Node]:
        return "/firmware", Node("vendor-fw", {"compatible": "vendor,firmware", "method": "hvc"})


def test_a_service_adds_its_own_node() -> None:
    board = Board(1, sdei=True)
    try:
        board.services.append(VendorFirmware())
        dts = decompile(board.dtb())
    finally:
        board.close()
    firmware = dts[dts.index("firmware {"):]
    assert "sdei {" in firmware and "vendor-fw {" in firmware and 'compatible = "vendor,firmware";' in firmware


def test_with_kvms_own_psci_the_tree_still_has_psci() -> None:
    """Vm(psci=False): KVM answers PSCI, and the CPUs' enable-method still needs /psci."""
    board = Board(2, conduit="smc")
    try:
        board.services = [KvmPsci("smc")]
        dts = decompile(board.dtb())
    finally:
        board.close()
    assert PSCI_COMPATIBLE in string_lists(dts, "compatible") and 'method = "smc";' in dts

"""The mach-virt device tree of a pyvmm VM (the shape kvmtool and QEMU's virt machine give Linux).

Bindings followed: arm/cpus.yaml (reg = MPIDR Aff2..Aff0, enable-method "psci"),
interrupt-controller/arm,gic-v3.yaml and arm,gic.yaml, timer/arm,arch_timer.yaml, chosen.yaml.
The tree is assembled from the machine's parts: devices add their own nodes through
`dt_node(phandles)`, firmware services (PSCI, SDEI) theirs through `Service.dt_node()`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol

from devicetree.builder import U64, Node, Phandles

GIC_PPI, GIC_SPI = 1, 0
IRQ_TYPE_LEVEL_HIGH = 4
TIMER_PPIS = (13, 14, 11, 10)  # secure phys, non-secure phys, virt, hyp phys (arch_timer.yaml order)
MPIDR_AFF_MASK = 0xFF_FFFF


class GicLayout(Protocol):
    version: int

    @property
    def its_region(self) -> tuple[int, int] | None:
        """(base, size) of a GICv3 ITS, or None."""

    @property
    def regions(self) -> list[tuple[int, int, str]]: ...


class DtPart(Protocol):
    """A device that adds its own node (kvmtool's generate_fdt_node callbacks)."""

    def dt_node(self, ph: Phandles) -> Node: ...


def machine_tree(*, cpus: Sequence[int], memory: Sequence[tuple[int, int]], gic: GicLayout,
                 devices: Sequence[DtPart] = (), firmware: Sequence[tuple[str, Node]] = (),
                 bootargs: str = "", initrd: tuple[int, int] | None = None, stdout: str | None = None,
                 kaslr_seed: int | None = None) -> Node:
    """`cpus`: each vCPU's MPIDR; `memory`: (base, size) of each RAM region; `firmware`: (parent
    path, node) of each firmware service's node (/psci, /firmware/sdei); `kaslr_seed`:
    /chosen/kaslr-seed (None: a random one)."""
    ph = Phandles()
    root = Node("/", {"compatible": "linux,dummy-virt", "model": "pyvmm", "#address-cells": 2,
                      "#size-cells": 2, "interrupt-parent": ph["gic"]})
    cpu_nodes = Node("cpus", {"#address-cells": 1, "#size-cells": 0})
    for mpidr in cpus:
        aff = mpidr & MPIDR_AFF_MASK
        cpu_nodes.children.append(Node(f"cpu@{aff:x}", {"device_type": "cpu", "compatible": "arm,arm-v8",
                                                        "reg": aff, "enable-method": "psci"}))
    root.children.append(cpu_nodes)
    for parent, node in firmware:
        _at(root, parent).children.append(node)
    for gpa, size in memory:
        root.children.append(Node(f"memory@{gpa:x}", {"device_type": "memory", "reg": [U64(gpa), U64(size)]}))
    root.children.append(gic_node(gic, ph))
    root.children.append(Node("timer", {
        "compatible": "arm,armv8-timer", "always-on": True,
        "interrupts": [c for ppi in TIMER_PPIS for c in (GIC_PPI, ppi, IRQ_TYPE_LEVEL_HIGH)]}))
    aliases = Node("aliases")
    for dev in devices:
        node = dev.dt_node(ph)
        root.children.append(node)
        alias = getattr(dev, "alias", None)
        if alias:
            aliases.props[alias] = f"/{node.name}"
    if kaslr_seed is None:
        kaslr_seed = int.from_bytes(os.urandom(8), "little")
    chosen = root.child("chosen", bootargs=bootargs, rng_seed=os.urandom(64), kaslr_seed=U64(kaslr_seed))
    if stdout:
        chosen.props["stdout-path"] = stdout
    if initrd is not None:
        chosen.props["linux,initrd-start"] = U64(initrd[0])
        chosen.props["linux,initrd-end"] = U64(initrd[1])
    if aliases.props:
        root.children.append(aliases)
    return root


def _at(root: Node, path: str) -> Node:
    """The node at `path`, made (empty) where missing."""
    node = root
    for part in filter(None, path.split("/")):
        found = next((c for c in node.children if c.name == part), None)
        if found is None:
            found = node.child(part)
        node = found
    return node


def gic_node(gic: GicLayout, ph: Phandles) -> Node:
    regs = [v for base, size, _ in gic.regions for v in (U64(base), U64(size))]
    compatible = "arm,gic-v3" if gic.version == 3 else "arm,cortex-a15-gic"
    node = Node(f"intc@{gic.regions[0][0]:x}", {
        "compatible": compatible, "#interrupt-cells": 3, "interrupt-controller": True, "reg": regs,
        "phandle": ph["gic"]})
    if gic.its_region is not None:
        its_base, its_size = gic.its_region
        # the ITS is the GIC node's child (bindings/interrupt-controller/arm,gic-v3.yaml), where
        # Linux and kvm-unit-tests look for it; MSI users name it by its phandle
        node.props.update({"#address-cells": 2, "#size-cells": 2, "ranges": True})
        node.child(f"msi-controller@{its_base:x}", compatible="arm,gic-v3-its", msi_controller=True,
                   reg=[U64(its_base), U64(its_size)], phandle=ph["its"], **{"#msi-cells": 1})
    return node

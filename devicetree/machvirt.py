"""The mach-virt device tree of a pyvmm VM (the shape kvmtool and QEMU's virt machine give Linux).

Bindings followed: arm/cpus.yaml (reg = MPIDR Aff2..Aff0, enable-method "psci"), arm/psci.yaml,
arm/firmware/sdei.txt, interrupt-controller/arm,gic-v3.yaml and arm,gic.yaml, timer/arm,arch_timer.yaml,
chosen.yaml. Devices add their own nodes through `dt_node(phandles)`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from devicetree.builder import U64, Node, Phandles

if TYPE_CHECKING:
    from pyvmm.vm import Vm

GIC_PPI, GIC_SPI = 1, 0
IRQ_TYPE_LEVEL_HIGH = 4
TIMER_PPIS = (13, 14, 11, 10)  # secure phys, non-secure phys, virt, hyp phys (arch_timer.yaml order)
MPIDR_AFF_MASK = 0xFF_FFFF


def machine_tree(vm: Vm, *, bootargs: str = "", initrd: tuple[int, int] | None = None,
                 stdout: str | None = None, sdei: bool | None = None) -> Node:
    """`sdei`: advertise /firmware/sdei (default: when the VM services SDEI)."""
    if sdei is None:
        sdei = getattr(vm, "sdei", None) is not None
    ph = Phandles()
    root = Node("/", {"compatible": "linux,dummy-virt", "model": "pyvmm", "#address-cells": 2,
                      "#size-cells": 2, "interrupt-parent": ph["gic"]})
    cpus = Node("cpus", {"#address-cells": 1, "#size-cells": 0})
    for v in vm.vcpus:
        aff = v.mpidr & MPIDR_AFF_MASK
        cpus.children.append(Node(f"cpu@{aff:x}", {"device_type": "cpu", "compatible": "arm,arm-v8", "reg": aff,
                                                   "enable-method": "psci"}))
    root.children.append(cpus)
    root.child("psci", compatible=["arm,psci-1.0", "arm,psci-0.2"], method=vm.smccc.conduit)
    if sdei:
        root.child("firmware").child("sdei", compatible="arm,sdei-1.0", method=vm.smccc.conduit)
    for r in vm.memory.regions:
        root.children.append(Node(f"memory@{r.gpa:x}", {"device_type": "memory", "reg": [U64(r.gpa), U64(r.size)]}))
    root.children.append(gic_node(vm, ph))
    root.children.append(Node("timer", {
        "compatible": "arm,armv8-timer", "always-on": True,
        "interrupts": [c for ppi in TIMER_PPIS for c in (GIC_PPI, ppi, IRQ_TYPE_LEVEL_HIGH)]}))
    aliases = Node("aliases")
    for dev in vm.dt_devices:
        node = dev.dt_node(ph)
        root.children.append(node)
        if getattr(dev, "alias", None):
            aliases.props[dev.alias] = f"/{node.name}"
    chosen = root.child("chosen", bootargs=bootargs, **{"rng_seed": os.urandom(64), "kaslr_seed": U64(
        int.from_bytes(os.urandom(8), "little"))})
    if stdout:
        chosen.props["stdout-path"] = stdout
    if initrd is not None:
        chosen.props["linux,initrd-start"] = U64(initrd[0])
        chosen.props["linux,initrd-end"] = U64(initrd[1])
    if aliases.props:
        root.children.append(aliases)
    return root


def gic_node(vm: Vm, ph: Phandles) -> Node:
    gic = vm.gic
    regs = [v for base, size, _ in gic.regions for v in (U64(base), U64(size))]
    compatible = "arm,gic-v3" if gic.version == 3 else "arm,cortex-a15-gic"
    return Node(f"intc@{gic.regions[0][0]:x}", {
        "compatible": compatible, "#interrupt-cells": 3, "interrupt-controller": True, "reg": regs,
        "phandle": ph["gic"]})

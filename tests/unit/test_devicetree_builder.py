"""The DT builder's output, checked by decompiling it with dtc."""

from __future__ import annotations

import pytest

from devicetree import Node, Phandles, build_dtb
from devicetree.builder import U64
from tests.dts import decompile, string_lists


def test_types_round_trip_through_dtc() -> None:
    ph = Phandles()
    root = Node("/", {"#address-cells": 2, "#size-cells": 2, "compatible": "linux,dummy-virt"})
    root.children.append(Node("memory@80000000", {"device_type": "memory", "reg": [U64(0x8000_0000), U64(0x1000_0000)]}))
    intc = root.child("intc", phandle=ph["gic"], interrupt_controller=True)
    root.child("psci", compatible=["arm,psci-1.0", "arm,psci-0.2"], method="hvc")
    root.child("virtio@3000000", dma_coherent=None, interrupt_parent=ph["gic"], blob=b"\x01\xff")
    dts = decompile(build_dtb(root))
    assert 'compatible = "linux,dummy-virt";' in dts
    assert "reg = <0x00 0x80000000 0x00 0x10000000>;" in dts
    assert string_lists(dts, "compatible") == [["linux,dummy-virt"], ["arm,psci-1.0", "arm,psci-0.2"]]
    assert "interrupt-controller;" in dts and "dma-coherent;" in dts
    assert "interrupt-parent = <0x01>;" in dts and "phandle = <0x01>;" in dts
    assert "blob = [01 ff];" in dts
    assert root.find("/intc") is intc


def test_empty_string_property() -> None:
    dts = decompile(build_dtb(Node("/", {"bootargs": ""})))
    assert "bootargs = [00];" in dts  # dtc shows the empty string as its one NUL byte


def test_bad_values_are_refused() -> None:
    with pytest.raises(ValueError, match="32 bits"):
        build_dtb(Node("/", {"x": 1 << 32}))
    with pytest.raises(ValueError, match="root node"):
        build_dtb(Node("notroot"))

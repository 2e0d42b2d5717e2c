"""Flattened device trees for pyvmm's guests, built on pyfdt."""

from devicetree.builder import Node, Phandles, build_dtb

__all__ = ["Node", "Phandles", "build_dtb"]

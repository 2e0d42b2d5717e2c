"""A small typed layer over pyfdt: nodes as Python values, properties by type, one DTB out.

Property values map onto the devicetree specification's types (DTSpec 0.4, §2.2.4):
  int                -> <u32>            list[int]   -> <u32 u32 ...> (prop-encoded-array)
  str                -> string           list[str]   -> stringlist
  bytes              -> raw bytes        U64(v)      -> <u64> as two cells
  None / True        -> empty property (a boolean such as "dma-coherent")
Devices contribute their own nodes (kvmtool's and Firecracker's shape), so the tree is assembled
from the machine's parts rather than written out in one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from pyfdt.pyfdt import Fdt, FdtNode, FdtProperty, FdtPropertyBytes, FdtPropertyStrings, FdtPropertyWords

if TYPE_CHECKING:
    from typing_extensions import TypeIs


class U64:
    """A 64-bit value written as two cells (high, low)."""

    __slots__ = ("value",)

    def __init__(self, value: int) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, U64) and other.value == self.value

    def __hash__(self) -> int:
        return hash(self.value)


Value = int | str | bytes | U64 | list[int] | list[str] | list[U64] | list[int | U64] | None | bool


class Node:
    __slots__ = ("name", "props", "children")

    def __init__(self, name: str, props: dict[str, Value] | None = None, children: list[Node] | None = None) -> None:
        self.name = name
        self.props: dict[str, Value] = {} if props is None else props
        self.children: list[Node] = [] if children is None else children

    def __repr__(self) -> str:
        return f"Node({self.name!r}, {len(self.props)} properties, {len(self.children)} children)"

    def child(self, name: str, **props: Value) -> Node:
        """Add and return a child node; keyword names use '_' for '-' and '__' for ','
        (a name that really has '_', such as device_type, goes in a props dict instead)."""
        node = Node(name, {_prop_name(k): v for k, v in props.items()})
        self.children.append(node)
        return node

    def set(self, name: str, value: Value = None) -> Node:
        self.props[name] = value
        return self

    def find(self, path: str) -> Node | None:
        node: Node | None = self
        for part in filter(None, path.split("/")):
            node = next((c for c in node.children if c.name == part), None) if node else None
        return node


class Phandles:
    """Hands out phandles by label, so nodes can refer to each other before both exist."""

    def __init__(self) -> None:
        self._by_label: dict[str, int] = {}

    def __getitem__(self, label: str) -> int:
        return self._by_label.setdefault(label, len(self._by_label) + 1)


def _prop_name(key: str) -> str:
    return key.replace("__", ",").replace("_", "-")


def _cells(values: Sequence[int | U64]) -> list[int]:
    words: list[int] = []
    for v in values:
        if isinstance(v, U64):
            words += [(v.value >> 32) & 0xFFFF_FFFF, v.value & 0xFFFF_FFFF]
        else:
            if not 0 <= v <= 0xFFFF_FFFF:
                raise ValueError(f"cell value {v:#x} does not fit 32 bits")
            words.append(v)
    return words


def _property(name: str, value: Value) -> FdtProperty:
    if value is None or value is True:
        return FdtProperty(name)
    if isinstance(value, str):
        if not value:  # pyfdt refuses "", which is a valid (one NUL byte) string property
            return FdtPropertyBytes(name, [0])
        return FdtPropertyStrings(name, [value])
    if isinstance(value, bytes):
        return FdtPropertyBytes(name, [b - 256 if b > 127 else b for b in value])  # pyfdt wants int8
    if isinstance(value, int | U64):
        return FdtPropertyWords(name, _cells([value]))
    if isinstance(value, list) and value:
        if _is_stringlist(value):
            return FdtPropertyStrings(name, list(value))
        return FdtPropertyWords(name, _cells(value))
    raise ValueError(f"property {name!r} has an unsupported value {value!r}")


def _is_stringlist(value: list[int] | list[str] | list[U64] | list[int | U64]) -> TypeIs[list[str]]:
    return all(isinstance(v, str) for v in value)


def _to_fdt_node(node: Node) -> FdtNode:
    fnode = FdtNode(node.name)
    for name, value in node.props.items():
        if value is False:
            continue
        fnode.append(_property(name, value))
    for child in node.children:
        fchild = _to_fdt_node(child)
        fchild.set_parent_node(fnode)
        fnode.append(fchild)
    return fnode


def build_dtb(root: Node, boot_cpuid: int = 0) -> bytes:
    """Serialise the tree rooted at `root` (named "/") to a version-17 DTB."""
    if root.name != "/":
        raise ValueError("the root node is named '/'")
    fdt = Fdt(version=17, last_comp_version=16, boot_cpuid_phys=boot_cpuid)
    fdt.add_rootnode(_to_fdt_node(root))
    dtb: bytes = fdt.to_dtb()
    return dtb

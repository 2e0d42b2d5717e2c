"""The emulated host's shapes: the kinds of arm64 KVM host pyvmm meets, each as a QEMU machine
and a Debian kernel package. The host and its L2 guests run the same kernel package, as on a real
host of that shape (a 16K host's own kernel is what `pyvmm exec` boots there).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    name: str
    gic: int  # QEMU's gic-version: what the host's irqchip is, so which vGIC its KVM offers
    kernel_meta: str  # the metapackage whose Depends: names the versioned kernel package
    suite: str  # where that metapackage comes from
    files: str  # the image files' folder under the cache ("": the cache itself, default's place)
    page_kib: int  # what the host must turn out to be, as the KVM tier reports it (tests/conftest.py)
    smccc_filter: bool

    def kernel_choice(self) -> str:
        return f"{self.kernel_meta}/{self.suite}"

    def expected(self) -> str:
        """The KVM tier's words for this shape ("vGICv3, 4K pages, SMCCC filter present")."""
        return (f"vGICv{self.gic}, {self.page_kib}K pages, "
                f"SMCCC filter {'present' if self.smccc_filter else 'missing'}")


# In the order `armhost matrix` runs them. default's files stay at the top of the cache, where
# tests/conftest.py and native runs look for the L2 guest; gicv2 differs from it only in QEMU's
# command, so it shares them.
SHAPES = {s.name: s for s in (
    Shape("default", 3, "linux-image-arm64", "bookworm-backports", "", 4, True),  # Linux 6.12, 4K pages
    Shape("gicv2", 2, "linux-image-arm64", "bookworm-backports", "", 4, True),  # a GIC-400-like GICv2
    Shape("16k", 3, "linux-image-arm64-16k", "bookworm-backports", "16k", 16, True),  # 16K pages
    Shape("linux6.1", 3, "linux-image-arm64", "bookworm", "linux6.1", 4, False),  # Debian 12's own kernel
)}


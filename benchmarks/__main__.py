"""Run every benchmark: `python -m benchmarks` (needs /dev/kvm; `make bench` arranges it)."""

from __future__ import annotations

import os
import platform

from benchmarks import boot, hypercall, sdei, startup, virtio


def main() -> None:
    where = "emulated arm64 host" if os.environ.get("PYVMM_IN_ARMHOST") else "native"
    print(f"pyvmm benchmarks on Linux {platform.release()} {platform.machine()} ({where})")
    startup.main()
    hypercall.main()
    sdei.main()
    boot.main()
    virtio.main()


if __name__ == "__main__":
    main()

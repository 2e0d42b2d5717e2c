"""Run every benchmark: `python -m benchmarks` (needs /dev/kvm; `make bench` arranges it)."""

from __future__ import annotations

import os
import platform

from benchmarks import (
    boot,
    dispatch,
    guest_exec,
    hypercall,
    net,
    sdei,
    shares,
    smp,
    startup,
    virtio,
    virtio_path,
    vsock,
)
from pyvmm.errors import VmmError


def main() -> None:
    where = "emulated arm64 host" if os.environ.get("PYVMM_IN_ARMHOST") else "native"
    print(f"pyvmm benchmarks on Linux {platform.release()} {platform.machine()} ({where})")
    startup.main()
    dispatch.main()  # needs no KVM: the Python part of the round trips hypercall measures next
    calls = hypercall.main()
    smp.main()
    sdei.main()
    plain = boot.main()
    virtio_path.main()  # needs no KVM: the Python part of the 4 KiB requests virtio measures next
    virtio.main(calls["floor_us"])
    net.main()
    vsock.main()
    guest_exec.main(plain["to_init_s"])
    shares.main()


if __name__ == "__main__":
    try:
        main()
    except VmmError as e:  # no KVM, a busy tap, a missing guest: one line, not a traceback
        raise SystemExit(f"pyvmm benchmarks: {e}") from None

"""Start-up cost: the interpreter, pyvmm's imports in a fresh one, what the out-of-line FFI saves.

The run path is what `pyvmm run` imports before it enters the guest (the CLI, the boot loader,
the VM and the device models); the interpreter's own start-up is the floor of any Python VMM.

kvm_bindings ships its declarations as an out-of-line ABI-mode module (see ffi_build.py), so
no C declaration is parsed at start-up; the baseline parses the same cdefs in-line with cffi.

pyvmm's own memory when the guest first runs is measured with `pyvmm run` itself as far as its
first KVM_RUN (KVM faked: tests/unit/first_kvm_run.py), a minimal kernel and 2 vCPUs: what it
holds besides the guest's RAM, against a bare interpreter's. On any host.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import median

RUNS = 5
RUN_PATH = ("import pyvmm.cli, pyvmm.cli.app, pyvmm.devices.virtio.registry, pyvmm.boot.load, pyvmm.machine.vm, "
            "pyvmm.devices.virtio")  # tests/unit/test_startup_imports.py


def importtime(module: str) -> dict[str, int]:
    """Cumulative import time (us) of every module, from `python -X importtime`."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"],
                         capture_output=True, text=True, check=True).stderr
    times = {}
    for line in out.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|\s*(\S+)", line)
        if m:
            times[m.group(2)] = int(m.group(1))
    return times


def wall_us(code: str) -> int:
    """Microseconds from launching a fresh interpreter to the end of `code` in it (CLOCK_MONOTONIC
    is system-wide, so the child reads the same clock the parent started)."""
    started = time.monotonic()
    probe = f"\nimport time; print(int((time.monotonic() - {started!r}) * 1e6))"
    return int(subprocess.run([sys.executable, "-c", code + probe], capture_output=True, text=True,
                              check=True).stdout)


def inline_cdef_us() -> int:
    code = ("import time, cffi; from kvm_bindings import cdef_linux_kvm as a, cdef_asm_kvm as b, cdef_libc as c; "
            "t = time.perf_counter(); f = cffi.FFI(); [f.cdef(x.CDEF) for x in (a, b, c)]; "
            "f.sizeof('struct kvm_run'); print(int((time.perf_counter() - t) * 1e6))")
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def first_kvm_run() -> tuple[int, float]:
    """(KiB resident besides guest RAM, seconds from launch) at `pyvmm run`'s first KVM_RUN."""
    from pyvmm.boot.kernel import HEADER, IMAGE_MAGIC

    with tempfile.TemporaryDirectory() as tmp:
        kernel = Path(tmp) / "Image"
        kernel.write_bytes(HEADER.pack(0, 0, 0, 1 << 20, 2, 0, 0, 0, IMAGE_MAGIC, 0) + bytes(4096 - HEADER.size))
        env = {**os.environ, "FIRST_KVM_RUN_STARTED": repr(time.monotonic())}
        out = subprocess.run([sys.executable, "-m", "tests.unit.first_kvm_run", "--", "-c", "2", "-k", str(kernel)],
                             capture_output=True, text=True, check=True, env=env).stdout
    report = json.loads(out)
    return int(report["own_kib"]), float(report["seconds"])


def bare_rss_kib() -> int:
    code = "print(next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmRSS')))"
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def main() -> dict[str, float]:
    vm_us, ffi_us, inline_us, bare_us, run_us, own_kib, bare_kib = [], [], [], [], [], [], []
    to_run_s: list[float] = []
    for _ in range(RUNS):
        kib, seconds = first_kvm_run()
        own_kib.append(kib)
        to_run_s.append(seconds)
        bare_kib.append(bare_rss_kib())
        times = importtime("pyvmm.machine.vm")
        vm_us.append(times["pyvmm.machine.vm"])
        ffi_us.append(times["kvm_bindings._kvm_ffi"])
        inline_us.append(inline_cdef_us())
        bare_us.append(wall_us("pass"))
        run_us.append(wall_us(RUN_PATH))
    bare, run = median(bare_us) / 1000, median(run_us) / 1000
    print(f"start-up: fresh interpreter, {RUNS} runs (median)")
    print(f"  interpreter start-up alone (-c pass)         {bare:7.1f} ms  (the floor of any Python VMM)")
    print(f"  interpreter + pyvmm run's imports            {run:7.1f} ms  ({run / bare:.2f}x the interpreter alone;"
          f" {RUN_PATH.removeprefix('import ')})")
    print(f"  import pyvmm.machine.vm (whole VMM core)             {median(vm_us) / 1000:7.1f} ms")
    print(f"  of which the out-of-line FFI module          {median(ffi_us) / 1000:7.1f} ms")
    print(f"  parsing the same cdefs in-line instead       {median(inline_us) / 1000:7.1f} ms"
          f"  ({median(inline_us) / median(ffi_us):.0f}x the out-of-line import)")
    own, bare_rss = median(own_kib) / 1024, median(bare_kib) / 1024
    print(f"  pyvmm run to its first KVM_RUN (KVM faked)   {median(to_run_s) * 1000:7.1f} ms  (2 vCPUs, a minimal kernel)")
    print(f"  pyvmm's own RSS there                        {own:7.1f} MiB ({own - bare_rss:+.1f} MiB over a bare "
          f"interpreter's {bare_rss:.1f} MiB; guest RAM not counted)")
    return {"import_ms": median(vm_us) / 1000, "ffi_ms": median(ffi_us) / 1000, "inline_ms": median(inline_us) / 1000,
            "interpreter_ms": bare, "run_path_ms": run, "first_kvm_run_own_rss_mib": own}


if __name__ == "__main__":
    main()

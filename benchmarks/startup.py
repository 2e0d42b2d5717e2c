"""Start-up cost: importing pyvmm in a fresh interpreter, and what the out-of-line FFI saves.

kvm_bindings ships its declarations as an out-of-line ABI-mode module (see ffi_build.py), so
no C declaration is parsed at start-up; the baseline parses the same cdefs in-line with cffi.
"""

from __future__ import annotations

import re
import subprocess
import sys

from benchmarks.common import median

RUNS = 5


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


def inline_cdef_us() -> int:
    code = ("import time, cffi; from kvm_bindings import cdef_linux_kvm as a, cdef_asm_kvm as b, cdef_libc as c; "
            "t = time.perf_counter(); f = cffi.FFI(); [f.cdef(x.CDEF) for x in (a, b, c)]; "
            "f.sizeof('struct kvm_run'); print(int((time.perf_counter() - t) * 1e6))")
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def main() -> dict[str, float]:
    vm_us, ffi_us, inline_us = [], [], []
    for _ in range(RUNS):
        times = importtime("pyvmm.vm")
        vm_us.append(times["pyvmm.vm"])
        ffi_us.append(times["kvm_bindings._kvm_ffi"])
        inline_us.append(inline_cdef_us())
    print(f"start-up: fresh interpreter, {RUNS} runs (median)")
    print(f"  import pyvmm.vm (whole VMM core)             {median(vm_us) / 1000:7.1f} ms")
    print(f"  of which the out-of-line FFI module          {median(ffi_us) / 1000:7.1f} ms")
    print(f"  parsing the same cdefs in-line instead       {median(inline_us) / 1000:7.1f} ms"
          f"  ({median(inline_us) / median(ffi_us):.0f}x the out-of-line import)")
    return {"import_ms": median(vm_us) / 1000, "ffi_ms": median(ffi_us) / 1000, "inline_ms": median(inline_us) / 1000}


if __name__ == "__main__":
    main()

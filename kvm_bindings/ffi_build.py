"""Builds the out-of-line ABI-mode FFI module `kvm_bindings._kvm_ffi`.

Out-of-line ABI mode (cffi docs, "Out-of-line, ABI level") serialises the parsed declarations into
a small pure-Python module, so starting a VM never runs pycparser and needs no C compiler.
setup.py hands `ffibuilder` to cffi's setuptools integration (cffi_modules), which writes the
module into every build, so wheels carry it; `python -m kvm_bindings.ffi_build` (the Makefile)
writes it into a checkout.
"""

from __future__ import annotations

from pathlib import Path

import cffi

from kvm_bindings import cdef_asm_kvm, cdef_libc, cdef_linux_if_tun, cdef_linux_kvm, cdef_linux_vhost

MODULE = "kvm_bindings._kvm_ffi"


def make_builder() -> cffi.FFI:
    builder = cffi.FFI()
    # the arch header first: linux/kvm.h's structs embed its kvm_*_arch ones, as the kernel's does
    for cdef in (cdef_asm_kvm.CDEF, cdef_linux_kvm.CDEF, cdef_linux_if_tun.CDEF, cdef_linux_vhost.CDEF,
                 cdef_libc.CDEF):
        builder.cdef(cdef)
    builder.set_source(MODULE, None)
    return builder


def generate() -> Path:
    """Write _kvm_ffi.py next to this file and return its path."""
    package_dir = Path(__file__).resolve().parent
    make_builder().emit_python_code(str(package_dir / "_kvm_ffi.py"))
    return package_dir / "_kvm_ffi.py"


ffibuilder = make_builder()

if __name__ == "__main__":
    print(generate())

"""cffi bindings of the Linux KVM UAPI for arm64.

`ffi` knows every struct layout; `libc` exposes the few libc calls made through cffi. The FFI
module is generated (see ffi_build.py); if a checkout has not generated it yet, it is generated
here once, on first import.
"""

from __future__ import annotations

from typing import Any, TypeAlias

CData: TypeAlias = Any  # a cffi cdata object (a pointer, array or struct): cffi has no type stubs

try:
    from kvm_bindings._kvm_ffi import ffi
except ImportError:  # fresh checkout: generate once, then import the generated module
    from kvm_bindings.ffi_build import generate

    generate()
    from kvm_bindings._kvm_ffi import ffi

libc = ffi.dlopen(None)

__all__ = ["CData", "ffi", "libc"]

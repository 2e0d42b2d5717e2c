"""cffi bindings of the Linux KVM UAPI for arm64.

`ffi` knows every struct layout; `libc` exposes the few libc calls made through cffi. The FFI
module is generated at build time (ffi_build.py, through cffi's setuptools integration, so a
wheel is complete; the Makefile does it for a checkout). Without it the same declarations are
parsed here, in memory: slower to start, but nothing is written and nothing printed.
"""

from __future__ import annotations

from typing import Any, TypeAlias

CData: TypeAlias = Any  # a cffi cdata object (a pointer, array or struct): cffi has no type stubs

try:
    from kvm_bindings._kvm_ffi import ffi
except ImportError:  # a checkout nothing has built yet (and while the build itself runs)
    from kvm_bindings.ffi_build import make_builder

    ffi = make_builder()

libc = ffi.dlopen(None)

__all__ = ["CData", "ffi", "libc"]

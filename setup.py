"""The one thing pyproject.toml cannot say: the FFI module is generated at build time by cffi's
setuptools integration (cffi docs, "Out-of-line, ABI level"), so a built wheel is complete."""

import sys
from pathlib import Path

from setuptools import setup

# ffi_build.py takes its declarations from the kvm_bindings package of this source tree, which an
# isolated PEP 517 build does not have on sys.path
sys.path.insert(0, str(Path(__file__).resolve().parent))

setup(cffi_modules=["kvm_bindings/ffi_build.py:ffibuilder"])

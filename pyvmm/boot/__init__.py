"""Booting a machine: kernel formats (kernel.py) and `boot()`, which loads the images and the
device tree into a VM and points vCPU 0 at them (load.py)."""

from pyvmm.boot.load import boot

__all__ = ["boot"]

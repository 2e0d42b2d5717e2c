"""`pyvmm.vm.Vm`, where users have always found it: the VM is pyvmm.machine.vm's."""

from pyvmm.machine.vm import RAM_BASE, RunResult, Vm

__all__ = ["RAM_BASE", "RunResult", "Vm"]

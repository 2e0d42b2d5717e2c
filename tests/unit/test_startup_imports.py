"""`pyvmm run` loads only what its options use before the first KVM_RUN: under emulation each
module costs milliseconds of start-up (make bench, "start-up"), so the 9p server, the control
socket, SDEI, the GDB stub and their standard-library dependencies wait for the option that
needs them (pyvmm/cli/, pyvmm/devices/virtio/p9.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUN_PATH = ("pyvmm.cli", "pyvmm.boot.load", "pyvmm.machine.vm", "pyvmm.devices.virtio")  # as benchmarks/startup.py times it
DEFERRED = ("pyvmm.ninep.server", "pyvmm.cli.control", "pyvmm.services.sdei", "pyvmm.gdb", "socket",
            "socketserver", "platform")


def loaded_after(*modules: str) -> set[str]:
    """The modules a fresh interpreter holds after importing `modules` (a subprocess: this
    one has imported everything already)."""
    code = ("import importlib, json, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         check=True).stdout
    return set(json.loads(out))


def test_the_run_path_defers_what_options_ask_for() -> None:
    loaded = loaded_after(*RUN_PATH)
    assert set(RUN_PATH) <= loaded
    assert sorted(loaded & set(DEFERRED)) == []


@pytest.mark.parametrize("module", ["pyvmm.ninep.server", "pyvmm.cli.control", "pyvmm.services.sdei", "pyvmm.gdb"])
def test_a_deferred_module_still_imports(module: str) -> None:
    assert module in loaded_after(module)


def test_the_command_line_takes_its_signals_before_it_imports_the_vm() -> None:
    """`pyvmm` installs its stop handlers first thing in main() (cli.StopSignals): everything
    imported before main runs delays them, so the package and its command line load nothing of
    the VM (pyvmm/__init__.py loads Vm when first asked for)."""
    loaded = loaded_after("pyvmm.cli")  # what the console script imports before it calls main()
    assert sorted(m for m in loaded if m.startswith(("pyvmm", "cffi", "kvm_bindings", "devicetree"))) == [
        "pyvmm", "pyvmm.cli", "pyvmm.cli.signals", "pyvmm.errors"]
    assert not {"argparse", "logging"} & loaded  # the parser comes after the handlers
    import pyvmm

    assert pyvmm.Vm.__module__ == "pyvmm.machine.vm"  # the API still offers it, loaded on first use

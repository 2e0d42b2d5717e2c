"""`pyvmm run` loads only what its options use before the first KVM_RUN: under emulation each
module costs milliseconds of start-up (make bench, "start-up"), and each one's code and tables
stay resident for the whole run, so the 9p server, the control socket, SDEI, the GDB stub,
virtiofsd's launcher, the vhost-user socket, the service-file loader, the SMCCC trace and their
standard-library dependencies wait for the option that needs them (pyvmm/cli/,
pyvmm/devices/virtio/p9.py, fs.py, vhost_user/protocol.py)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pyvmm.boot.kernel import HEADER, IMAGE_MAGIC

ROOT = Path(__file__).resolve().parents[2]
RUN_PATH = ("pyvmm.cli", "pyvmm.cli.app", "pyvmm.devices.virtio.registry", "pyvmm.boot.load", "pyvmm.machine.vm",
            "pyvmm.devices.virtio")  # as benchmarks/startup.py times it
DEFERRED_PYVMM = ("pyvmm.ninep.server", "pyvmm.cli.control", "pyvmm.services.sdei", "pyvmm.gdb",
                  "pyvmm.devices.virtio.vhost_user.virtiofsd", "pyvmm.services.modules", "pyvmm.smccc.trace")
# what those load of the standard library: dataclasses brings inspect, ast and dis; virtiofsd's
# launcher subprocess and tempfile (and random); the sockets selectors; and shutil, which
# argparse would load for the terminal's width (pyvmm/cli/options.py), bz2 and lzma
DEFERRED = (*DEFERRED_PYVMM, "socket", "socketserver", "platform", "dataclasses", "inspect", "ast", "dis",
            "subprocess", "tempfile", "random", "selectors", "shutil", "bz2", "lzma")


def loaded_after(*modules: str) -> set[str]:
    """The modules a fresh interpreter holds after importing `modules` (a subprocess: this
    one has imported everything already)."""
    code = ("import importlib, json, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         check=True).stdout
    return set(json.loads(out))


def first_kvm_run(tmp_path: Path, *options: str) -> dict[str, Any]:
    """What `pyvmm run -k IMAGE OPTIONS` holds at its first KVM_RUN (tests/unit/first_kvm_run.py),
    IMAGE a minimal arm64 Image."""
    kernel = tmp_path / "Image"
    kernel.write_bytes(struct.pack("<II3Q3QII", 0, 0, 0, 1 << 20, 2, 0, 0, 0, IMAGE_MAGIC, 0) + bytes(4096 - HEADER.size))
    out = subprocess.run([sys.executable, "-m", "tests.unit.first_kvm_run", "--", "-k", str(kernel), *options],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report: dict[str, Any] = json.loads(out.stdout)
    return report


def test_the_run_path_defers_what_options_ask_for() -> None:
    loaded = loaded_after(*RUN_PATH)
    assert set(RUN_PATH) <= loaded
    assert sorted(loaded & set(DEFERRED)) == []


def test_pyvmm_run_has_loaded_none_of_them_when_the_guest_first_runs(tmp_path: Path) -> None:
    """The whole of `pyvmm run`, options parsed, VM built, images and device tree loaded, as far
    as the first KVM_RUN (KVM faked: this runs on any host)."""
    report = first_kvm_run(tmp_path, "-c", "2")
    loaded = set(report["modules"])
    assert {"pyvmm.machine.vm", "pyvmm.boot.load", "pyvmm.devices.virtio.registry"} <= loaded
    assert sorted(loaded & set(DEFERRED)) == []


def test_an_option_still_loads_what_it_needs(tmp_path: Path) -> None:
    """--trace smccc loads the trace printer before the guest runs (the probe of the previous
    test sees a module that comes back)."""
    loaded = set(first_kvm_run(tmp_path, "--trace", "smccc")["modules"])
    assert "pyvmm.smccc.trace" in loaded


@pytest.mark.parametrize("module", DEFERRED_PYVMM)
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

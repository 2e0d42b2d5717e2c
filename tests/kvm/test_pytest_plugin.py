"""The pytest plugin on real KVM, as a user runs it: pytest on examples/user_project, whose
tests use run_payload (its service module and guest over HVC and SMC, on 1 and 2 vCPUs, a
time limit), pyvmm_payloads and linux (commands in a Linux guest).

Inside the emulated arm64 host there is no assembler and no installed pyvmm: the payloads come
from the cache `make kvm` fills first (`make payloads`), and the plugin is loaded with -p from
the checkout on PYTHONPATH, the entry point left out (where pyvmm is installed it would load the
plugin a second time)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from pyvmm.errors import VmmError
from pyvmm.exec.session import default_kernel
from pyvmm.pytest_plugin import kvm_problem
from tests.conftest import ROOT, linux_guest
from tests.kvm.conftest import needs_filter

EXAMPLE = ROOT / "examples" / "user_project"
EXAMPLE_TESTS = 8
# seconds: one Linux boot (about 20 s in the emulated host) and a few small VMs, well inside
# the KVM tier's time limit per test
TIME_LIMIT = 170


def kernel_options() -> list[str]:
    """None where the running kernel's image is there (the emulated host, an arm64 machine); in
    a container without it (a CI runner's), the `linux` guests get the bundled Debian kernel and
    its module tree through the plugin's ini options, as a user would set them."""
    try:
        default_kernel()
        return []
    except VmmError:
        image, _ = linux_guest()
        return ["-o", f"pyvmm_linux_kernel={image}", "-o", f"pyvmm_linux_modules={image.parent.parent / 'modules'}"]


def test_this_host_passes_the_plugin_s_kvm_check() -> None:
    assert kvm_problem() is None


@needs_filter("the example project's tests use its own SMCCC service and guest reports")
@pytest.mark.parametrize("workers", [0, 2])
def test_the_example_project_passes_under_the_plugin(workers: int) -> None:
    """In one process, and under pytest-xdist with two workers (`-n 2`), where each worker makes
    its own VMs and boots its own Linux guest: the same tests pass, within the same limits."""
    env = dict(os.environ, PYTEST_DISABLE_PLUGIN_AUTOLOAD="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    env.pop("PYVMM_PAYLOAD_CACHE", None)
    p = subprocess.run([sys.executable, "-m", "pytest", "-p", "pyvmm.pytest_plugin", "-p", "no:cacheprovider",
                        "-q", "-rA", "--color=no", *kernel_options(),
                        *(["-p", "xdist", "-n", str(workers)] if workers else [])], cwd=EXAMPLE, env=env, capture_output=True, text=True,
                       timeout=TIME_LIMIT)
    shown = f"status {p.returncode}\n{p.stdout}\n{p.stderr}"
    assert p.returncode == 0, shown
    assert re.search(rf"^=* ?{EXAMPLE_TESTS} passed in [\d.]+s", p.stdout, re.MULTILINE), shown
    assert len(re.findall(r"^PASSED ", p.stdout, re.MULTILINE)) == EXAMPLE_TESTS, shown
    assert "for want of arm64 KVM" not in p.stdout, shown
    if workers:  # -rA names the worker that ran each test: both did
        assert set(re.findall(r"^\[(gw\d+)\] ", p.stdout, re.MULTILINE)) == {f"gw{n}" for n in range(workers)}, shown

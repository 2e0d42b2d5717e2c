"""The package as CI installs it: the wheel, built from this tree, installed into a fresh venv by
an unprivileged user, works and is complete (the FFI module is built in: nothing is written into
site-packages at import, nothing printed on stdout). pytest is no dependency of it; installed
with its `pytest` extra, pytest finds the plugin through the entry point."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT

NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.fixture
def world_readable_dir() -> Iterator[Path]:
    """pytest's tmp_path is private to its user; the unprivileged user needs its own place."""
    path = Path(tempfile.mkdtemp(prefix="pyvmm-dist-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def as_user(argv: list[str], home: Path) -> subprocess.CompletedProcess[str]:
    """Run as `nobody` when this is root (as `make test` is), else as this user."""
    prefix = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"] if os.getuid() == 0 else []
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8"}
    return subprocess.run(prefix + argv, capture_output=True, text=True, timeout=300, env=env, cwd=home)


def test_the_wheel_installs_and_runs_for_an_unprivileged_user(world_readable_dir: Path) -> None:
    wheels = world_readable_dir / "wheels"
    # the sdist, then the wheel from it, as `make dist` does: files a checkout happens to hold
    # (its own generated FFI module) cannot slip into the wheel that way
    subprocess.run([sys.executable, "-m", "build", "--outdir", str(wheels), str(ROOT)],
                   check=True, capture_output=True, timeout=600)
    wheel, = wheels.glob("pyvmm-*.whl")
    # its dependencies, and its pytest extra's, from the index this pip uses
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--use-pep517", "--disable-pip-version-check",
                    "-w", str(wheels), f"{wheel}[pytest]"], check=True, capture_output=True, timeout=600)
    home = world_readable_dir / "home"
    home.mkdir()
    if os.getuid() == 0:
        os.chown(world_readable_dir, NOBODY, NOBODY)
        os.chown(home, NOBODY, NOBODY)
    venv = world_readable_dir / "venv"
    # Debian's python3 (host-deps makes sure of it): this interpreter may live where others cannot go
    for argv in ([SYSTEM_PYTHON, "-m", "venv", str(venv)],
                 [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", "--no-index",
                  "--find-links", str(wheels), "pyvmm"]):
        p = as_user(argv, home)
        assert p.returncode == 0, p.stderr
    p = as_user([str(venv / "bin" / "pyvmm"), "--version"], home)
    assert (p.returncode, p.stdout.strip(), p.stderr) == (0, f"pyvmm {version()}", "")
    site = as_user([str(venv / "bin" / "python"), "-c",
                    "import kvm_bindings._kvm_ffi as m, kvm_bindings; print(m.__file__)"], home)
    assert site.returncode == 0 and site.stdout.strip().endswith("site-packages/kvm_bindings/_kvm_ffi.py"), site
    p = as_user([str(venv / "bin" / "pyvmm"), "check"], home)
    assert "Traceback" not in p.stderr and p.stdout.count("\n") + p.stderr.count("\n") >= 1, p
    check_the_pytest_plugin(venv, wheels, home)


def check_the_pytest_plugin(venv: Path, wheels: Path, home: Path) -> None:
    python = str(venv / "bin" / "python")
    p = as_user([python, "-c", "import importlib.util; print(importlib.util.find_spec('pytest'))"], home)
    assert (p.returncode, p.stdout.strip()) == (0, "None"), p  # `pip install pyvmm` brings no pytest
    p = as_user([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", "--no-index",
                 "--find-links", str(wheels), "pyvmm[pytest]"], home)
    assert p.returncode == 0, p.stderr
    (home / "test_plugin.py").write_text(
        "from pyvmm.testing.payload import INCLUDE_DIR\n\n"
        "def test_the_fixtures_are_there(pytestconfig, pyvmm_payloads):\n"
        "    assert pyvmm_payloads.cache.directory == pytestconfig.rootpath / 'build' / 'pyvmm-payloads'\n"
        "    assert (INCLUDE_DIR / 'pyvmm.inc').is_file()  # package data: payloads include it\n")
    # no -p: the plugin comes from the installed entry point (pytest11: pyvmm)
    p = as_user([python, "-m", "pytest", "-p", "no:cacheprovider", "--trace-config", "test_plugin.py"], home)
    assert p.returncode == 0 and "1 passed" in p.stdout, p.stdout + p.stderr
    site = next((venv / "lib").glob("python3*/site-packages"))
    assert f"pyvmm-{version()} at {site / 'pyvmm' / 'pytest_plugin.py'}" in p.stdout, p.stdout
    p = as_user([python, "-m", "pytest", "--help"], home)
    assert p.returncode == 0 and "--pyvmm-skip-without-kvm" in p.stdout, p.stdout + p.stderr


def version() -> str:
    from pyvmm import __version__

    return __version__

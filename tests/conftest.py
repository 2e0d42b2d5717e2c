"""Test tiers.

Unit tests run anywhere. Tests marked `kvm` need a real /dev/kvm on arm64: `make kvm` runs them
natively there, or inside the emulated arm64 host elsewhere, with PYVMM_KVM_TIER=1. In that tier
a KVM test that cannot run fails (it is never skipped), a skipped or missing test fails the
session, and the summary states how many ran against which kernel's KVM.

Host shapes (pyvmm/machine/host.py): a KVM test marked `@pytest.mark.host(smccc_filter=True, reason=...)`
(or gic=2|3, page_size=N) applies only where the host is so. Elsewhere it is not run and not
called passing: the summary lists it by name as not applicable, with the reason. Only a shape
KVM reports decides that; any other skip still fails the KVM tier.
"""

from __future__ import annotations

import faulthandler
import importlib.metadata
import os
import platform
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pyvmm.machine.host import HostShape, probe
from tests import fuzzing

# pyvmm tests itself through its pytest plugin, as a user's project does: loaded here unless
# pytest already loaded it as an installed distribution's plugin (entry point `pyvmm`), which a
# second registration would clash with. The emulated arm64 host runs the checkout uninstalled.
PLUGIN_AUTOLOADED = not os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD") and any(
    ep.name == "pyvmm" and ep.value == "pyvmm.pytest_plugin"
    for ep in importlib.metadata.entry_points(group="pytest11"))
pytest_plugins = [] if PLUGIN_AUTOLOADED else ["pyvmm.pytest_plugin"]

ROOT = Path(__file__).resolve().parents[1]
KVM_TIER = os.environ.get("PYVMM_KVM_TIER") == "1"
# seconds; a stuck test dumps its threads and ends the session (a fuzz campaign's tests run longer)
KVM_TEST_TIME_LIMIT = 1800 if fuzzing.CAMPAIGN else 180


def have_kvm() -> bool:
    return platform.machine() == "aarch64" and os.access("/dev/kvm", os.R_OK | os.W_OK)


# What `pyvmm` says once on stderr where the host has no SMCCC filter (pyvmm/machine/vm.py)
NO_FILTER_NOTE = "has no SMCCC filter: guests run with KVM's in-kernel PSCI"


def errors(stderr: str | bytes) -> list[str]:
    """pyvmm's stderr, a line each, without the no-SMCCC-filter note (the host shape's, not the test's)."""
    text = stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr
    return [line for line in text.strip().splitlines() if NO_FILTER_NOTE not in line]


def linux_guest() -> tuple[Path, Path]:
    """Debian's arm64 kernel Image and the busybox initramfs (built by tools/armhost)."""
    where = Path(os.environ.get("PYVMM_GUEST_IMAGES", ROOT / ".cache" / "armhost" / "guest"))
    image, initrd = where / "Image", where / "initrd.cpio"
    if not (image.is_file() and initrd.is_file()):
        pytest.fail(f"the Linux guest images are missing under {where}: run `make guest-images`")
    return image, initrd


NOT_APPLICABLE = "does not apply to this host: "
_host_shape: list[HostShape] = []  # probed once, at the first test that asks


def host_shape() -> HostShape:
    if not _host_shape:
        _host_shape.append(probe())
    return _host_shape[0]


def not_applicable(marks: Iterable[pytest.Mark], shape: HostShape) -> str | None:
    """Why a test with these `host` marks does not apply to a host of `shape`, or None if it does."""
    for mark in marks:
        wanted = {k: v for k, v in mark.kwargs.items() if k != "reason"}
        unknown = set(wanted) - set(HostShape._fields)
        if unknown or not wanted or mark.args:
            raise pytest.UsageError(f"host() marker: keyword arguments naming HostShape fields, not {mark}")
        differs = [f"{k}={getattr(shape, k)!r}" for k, v in wanted.items() if getattr(shape, k) != v]
        if differs:
            reason = mark.kwargs.get("reason") or ", ".join(f"needs {k}={v!r}" for k, v in wanted.items())
            return f"{reason} (this host: {', '.join(differs)})"
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("kvm") and not have_kvm():
        if KVM_TIER:
            pytest.fail(f"KVM tier without a usable /dev/kvm on {platform.machine()}")
        pytest.skip("needs /dev/kvm on arm64: `make kvm` runs this tier (in the emulated host on x86)")
    if item.get_closest_marker("kvm") and item.get_closest_marker("host"):
        why = not_applicable(item.iter_markers("host"), host_shape())
        if why is not None:
            pytest.skip(NOT_APPLICABLE + why)


def _skip_reason(report: pytest.TestReport) -> str:
    return str(report.longrepr[2]) if isinstance(report.longrepr, tuple) else ""


def _not_applicable_reports(stats: dict[str, list[Any]]) -> list[pytest.TestReport]:
    return [r for r in stats.get("skipped", []) if isinstance(r, pytest.TestReport)
            and NOT_APPLICABLE in _skip_reason(r)]


@pytest.fixture(autouse=True)
def _kvm_watchdog(request: pytest.FixtureRequest) -> Iterator[None]:
    if request.node.get_closest_marker("kvm"):
        faulthandler.dump_traceback_later(KVM_TEST_TIME_LIMIT, exit=True, file=sys.__stderr__ or sys.stderr)
        yield
        faulthandler.cancel_dump_traceback_later()
    else:
        yield


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: pytest.ExitCode,
                            config: pytest.Config) -> None:
    for line in fuzzing.summary_lines():
        terminalreporter.write_line(line)
    if not KVM_TIER:
        return
    stats = terminalreporter.stats
    count = {k: len([r for r in stats.get(k, []) if getattr(r, "when", "call") in ("call", "setup")])
             for k in ("passed", "failed", "error", "skipped")}
    na = _not_applicable_reports(stats)
    where = f"Linux {platform.release()} {platform.machine()}"
    if shape := os.environ.get("PYVMM_ARMHOST_SHAPE"):
        where += f", inside the emulated arm64 host (shape {shape})"
    elif os.environ.get("PYVMM_IN_ARMHOST"):
        where += ", inside the emulated arm64 host"
    else:
        where += ", native"
    if have_kvm():  # the shape as KVM gives it (tools/armhost matrix checks each row's against its name)
        s = host_shape()
        where += (f"; vGICv{s.gic}, {s.page_size >> 10}K pages, SMCCC filter "
                  f"{'present' if s.smccc_filter else 'missing'}")
    terminalreporter.write_line(f"KVM tier ran against real /dev/kvm ({where}):")
    if na:
        terminalreporter.write_line(f"not applicable to this host ({len(na)}):")
        for r in na:
            terminalreporter.write_line(f"  {r.nodeid}: {_skip_reason(r).split(NOT_APPLICABLE, 1)[1]}")
    terminalreporter.write_line(
        f"kvm: {count['passed']} passed, {count['failed'] + count['error']} failed, "
        f"{count['skipped'] - len(na)} skipped, {len(na)} not applicable")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not KVM_TIER:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    stats = reporter.stats if reporter else {}
    skipped = len(stats.get("skipped", [])) - len(_not_applicable_reports(stats))
    if skipped or not stats.get("passed"):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED

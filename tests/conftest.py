"""Test tiers.

Unit tests run anywhere. Tests marked `kvm` need a real /dev/kvm on arm64: `make kvm` runs them
natively there, or inside the emulated arm64 host elsewhere, with PYVMM_KVM_TIER=1. In that tier
a KVM test that cannot run fails (it is never skipped), a skipped or missing test fails the
session, and the summary states how many ran against which kernel's KVM.
"""

from __future__ import annotations

import faulthandler
import os
import platform
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import fuzzing

ROOT = Path(__file__).resolve().parents[1]
GUESTS = ROOT / "build" / "guests"
KVM_TIER = os.environ.get("PYVMM_KVM_TIER") == "1"
# seconds; a stuck test dumps its threads and ends the session (a fuzz campaign's tests run longer)
KVM_TEST_TIME_LIMIT = 1800 if fuzzing.CAMPAIGN else 180


def have_kvm() -> bool:
    return platform.machine() == "aarch64" and os.access("/dev/kvm", os.R_OK | os.W_OK)


def guest_image(name: str) -> Path:
    path = GUESTS / f"{name}.bin"
    if not path.is_file():
        pytest.fail(f"guest payload {path} is missing: run `make guests`")
    return path


def linux_guest() -> tuple[Path, Path]:
    """Debian's arm64 kernel Image and the busybox initramfs (built by tools/armhost)."""
    where = Path(os.environ.get("PYVMM_GUEST_IMAGES", ROOT / ".cache" / "armhost" / "guest"))
    image, initrd = where / "Image", where / "initrd.cpio"
    if not (image.is_file() and initrd.is_file()):
        pytest.fail(f"the Linux guest images are missing under {where}: run `make guest-images`")
    return image, initrd


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("kvm") and not have_kvm():
        if KVM_TIER:
            pytest.fail(f"KVM tier without a usable /dev/kvm on {platform.machine()}")
        pytest.skip("needs /dev/kvm on arm64: `make kvm` runs this tier (in the emulated host on x86)")


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
    where = f"Linux {platform.release()} {platform.machine()}"
    where += ", inside the emulated arm64 host" if os.environ.get("PYVMM_IN_ARMHOST") else ", native"
    terminalreporter.write_line(f"KVM tier ran against real /dev/kvm ({where}):")
    terminalreporter.write_line(
        f"kvm: {count['passed']} passed, {count['failed'] + count['error']} failed, {count['skipped']} skipped")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not KVM_TIER:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    stats = reporter.stats if reporter else {}
    if stats.get("skipped") or not stats.get("passed"):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED

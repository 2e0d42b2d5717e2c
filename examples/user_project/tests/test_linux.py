"""Commands in a Linux guest on the host's root (one guest boots for this module's tests)."""

from __future__ import annotations

from pyvmm.pytest_plugin import LinuxGuest


def test_the_guest_is_arm64_linux_on_pyvmm_s_psci(linux: LinuxGuest) -> None:
    done = linux.run(["uname", "-m"])
    assert (done.status, done.stdout, done.stderr) == (0, b"aarch64\n", b"")
    version, *_ = linux.trace.calls_to("PSCI_VERSION")  # Linux asks at boot; pyvmm's PSCI answers
    assert (version.vcpu, version.results) == (0, (0x1_0001,))  # PSCI 1.1


def test_a_failing_command_shows_its_status_and_stderr(linux: LinuxGuest) -> None:
    done = linux.run("echo out; echo err >&2; exit 3")
    assert (done.status, done.stdout, done.stderr) == (3, b"out\n", b"err\n")
    missing = linux.run(["ls", "/no/such/file"])
    assert missing.status != 0 and b"No such file" in missing.stderr and missing.stdout == b""

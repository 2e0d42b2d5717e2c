"""`linux` and `make_linux`: Linux guests on the host's root (pyvmm exec's LinuxSession)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from pyvmm.testing.hooks import require_kvm
from pyvmm.testing.options import linux_options, seconds, time_limit
from pyvmm.testing.reports import add_services
from pyvmm.testing.trace import SmcccTrace

if TYPE_CHECKING:
    from pyvmm.exec.session import Completed, LinuxSession
    from pyvmm.machine.vm import Vm
    from pyvmm.testing.reports import ServiceSpec


# --- Linux guests ------------------------------------------------------------------------------
class LinuxBoot:
    """One Linux guest (pyvmm.exec.session.LinuxSession), booted at its first command. A guest that
    dies, or whose command runs out of time, is let go: the next command boots a new one. A
    boot that fails is not tried again for the tests that share it."""

    def __init__(self, options: dict[str, Any], *, services: Sequence[ServiceSpec] = (),
                 configure: Callable[[Vm], None] | None = None, boot_timeout: float, base: Path) -> None:
        self.options, self.services, self.configure = options, services, configure
        self.boot_timeout, self.base = boot_timeout, base
        self._session: LinuxSession | None = None
        self.trace = SmcccTrace()
        self.boot_error: str | None = None

    def session(self) -> LinuxSession:
        if self._session is not None:
            return self._session
        if self.boot_error is not None:
            pytest.fail(f"pyvmm: the Linux guest failed to boot for an earlier test: {self.boot_error}", pytrace=False)
        from pyvmm.errors import VmmError
        from pyvmm.exec.session import GuestTimedOut, LinuxSession

        trace = SmcccTrace()

        def configure(vm: Vm) -> None:
            add_services(vm.smccc, vm.service_context, self.services, self.base)
            trace.attach(vm)
            if self.configure is not None:
                self.configure(vm)

        try:
            session = LinuxSession(**self.options, configure=configure)
        except VmmError as e:
            self.boot_error = str(e)
            raise
        try:
            session.start(timeout=self.boot_timeout)
        except GuestTimedOut:
            session.stop("the guest did not boot in time")
            session.close()
            self.boot_error = f"the Linux guest was not ready within {self.boot_timeout:g} s (pyvmm_boot_timeout)"
            raise GuestTimedOut(self.boot_error) from None
        except BaseException as e:
            session.close()
            self.boot_error = str(e) or type(e).__name__
            raise
        self._session, self.trace = session, trace
        return session

    def discard(self) -> None:
        """Stop and close the guest (a new one boots for the next command)."""
        session, self._session = self._session, None
        if session is not None:
            session.stop("let go by the pytest plugin")
            session.close()

    def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            session.close()


class LinuxGuest:
    """A Linux guest as a test uses it: run() commands in it, each within the test's limit."""

    def __init__(self, boot: LinuxBoot, item: pytest.Item) -> None:
        self._boot, self._item = boot, item

    @property
    def session(self) -> LinuxSession:
        """The LinuxSession, booted if it was not yet."""
        require_kvm(self._item)
        return self._boot.session()

    @property
    def trace(self) -> SmcccTrace:
        """The SMCCC calls of the guest now running (or last run), from its boot on."""
        return self._boot.trace

    def run(self, command: Sequence[str] | str, *, env: Mapping[str, str] | None = None, cwd: str = "/",
            timeout: float | None = None) -> Completed:
        """Run `command` (argv, or a string for sh -c) in the guest: Completed(status, stdout,
        stderr). A status is the command's; GuestTimedOut after `timeout` (default: the test's
        limit), GuestFailed if the guest ends first (the next command boots a new guest)."""
        from pyvmm.exec.session import GuestFailed, GuestTimedOut

        limit = seconds(timeout, "timeout=") if timeout is not None else time_limit(self._item)
        session = self.session
        shown = command if isinstance(command, str) else " ".join(command)
        try:
            done = session.run(command, env=env, cwd=cwd, timeout=limit)
        except GuestTimedOut:
            self._boot.discard()
            raise GuestTimedOut(f"`{shown}` did not finish within {limit:g} s; its guest was stopped") from None
        except GuestFailed:
            self._boot.discard()
            raise
        self._item.add_report_section("call", f"pyvmm linux `{shown}`",
                                      f"status {done.status}\nstdout: {done.stdout[-2048:]!r}\n"
                                      f"stderr: {done.stderr[-2048:]!r}")
        return done


class MakeLinux:
    """The `make_linux` fixture: make_linux(...) -> a booted LinuxGuest of its own."""

    def __init__(self, item: pytest.Item) -> None:
        self._item = item
        self._boots: list[LinuxBoot] = []

    def __call__(self, *, kernel: str | os.PathLike[str] | None = None, modules: str | os.PathLike[str] | None = None,
                 rwdirs: Sequence[str | os.PathLike[str]] | None = None, cpus: int | None = None,
                 mem_mib: int | None = None, params: str | None = None, conduit: str = "hvc",
                 console_log: str | os.PathLike[str] | None = None, services: Sequence[ServiceSpec] = (),
                 configure: Callable[[Vm], None] | None = None, boot_timeout: float | None = None) -> LinuxGuest:
        """Boot a Linux guest (what is not given comes from the pyvmm_linux_* ini options):
        `services` are added to its VM and `configure(vm)` runs before it boots."""
        require_kvm(self._item)
        config = self._item.config
        options = linux_options(config)
        given = {"kernel": kernel, "modules": modules, "cpus": cpus, "mem_mib": mem_mib, "params": params,
                 "rwdirs": None if rwdirs is None else [str(d) for d in rwdirs]}
        options.update({k: str(v) if isinstance(v, os.PathLike) else v for k, v in given.items() if v is not None})
        options["conduit"] = conduit
        options["console_log"] = None if console_log is None else str(console_log)
        limit = (seconds(boot_timeout, "boot_timeout=") if boot_timeout is not None
                 else seconds(config.getini("pyvmm_boot_timeout"), "ini option pyvmm_boot_timeout"))
        boot = LinuxBoot(options, services=services, configure=configure, boot_timeout=limit, base=config.rootpath)
        self._boots.append(boot)
        boot.session()
        return LinuxGuest(boot, self._item)

    def close(self) -> None:
        for boot in self._boots:
            boot.close()



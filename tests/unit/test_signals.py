"""pyvmm's stop signals from its first instant (cli.StopSignals): before a command hands over its
machine a signal unwinds the set-up, after it the machine is stopped, and a step that must not
be cut in half holds the signal until it has ended."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator

import pytest

from pyvmm import cli
from pyvmm.cli import app
from pyvmm.errors import VmmError


@pytest.fixture
def signals() -> Iterator[cli.StopSignals]:
    s = cli.StopSignals()
    yield s
    s.restore()


def test_a_signal_during_set_up_unwinds_it(signals: cli.StopSignals) -> None:
    with pytest.raises(cli.Interrupted) as caught:
        os.kill(os.getpid(), signal.SIGTERM)  # its handler runs before the next line
        pytest.fail("the signal did not interrupt the set-up")
    assert caught.value.signo == signal.SIGTERM and signals.message() == "stopped by SIGTERM"


def test_once_handed_over_a_signal_stops_the_machine(signals: cli.StopSignals) -> None:
    stopped = threading.Event()
    why: list[str] = []

    def stop(message: str) -> None:
        why.append(message)
        stopped.set()

    signals.stop_with(stop)
    os.kill(os.getpid(), signal.SIGHUP)  # no exception: the stop comes on a thread of its own
    assert stopped.wait(5) and why == ["stopped by SIGHUP"]


def test_a_deferred_step_finishes_before_the_signal_counts(signals: cli.StopSignals) -> None:
    steps = []
    with pytest.raises(cli.Interrupted):
        with signals.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            steps.append("written")  # still run: the signal waits for the block
            steps.append("removed if it failed")
    assert steps == ["written", "removed if it failed"]


def test_a_deferred_step_that_fails_still_ends_with_the_signal(signals: cli.StopSignals) -> None:
    """`pyvmm exec` whose session fails to start after a SIGTERM came: 143, not the set-up's error."""
    with pytest.raises(cli.Interrupted) as caught:
        with signals.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            raise VmmError("the session could not start")
    assert caught.value.signo == signal.SIGTERM


def test_a_deferred_step_that_hands_over_its_machine_has_it_stopped(signals: cli.StopSignals) -> None:
    stopped = threading.Event()
    with signals.deferred():
        os.kill(os.getpid(), signal.SIGINT)
        signals.stop_with(lambda message: stopped.set())
    assert stopped.wait(5)


def test_main_ends_with_128_plus_n_and_one_line(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    def set_up(argv: list[str] | None, signals: cli.StopSignals | None) -> int:
        os.kill(os.getpid(), signal.SIGTERM)  # a moment after start, before any VM
        return 0

    monkeypatch.setattr(app, "command", set_up)
    assert cli.main(["run", "-f", "x"]) == 128 + signal.SIGTERM
    assert capsys.readouterr().err == "pyvmm: stopped by SIGTERM before the guest ran\n"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are gone again


def test_a_signal_the_user_ignored_stays_ignored() -> None:
    old = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        s = cli.StopSignals()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        s.restore()
    finally:
        signal.signal(signal.SIGHUP, old)

"""The control socket: requests a person sends to a running VM, and what they get back."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvmm import cli
from pyvmm.cli.control import MAX_DEPTH, NOT_AN_OBJECT, ControlServer, request
from pyvmm.errors import VmmError
from pyvmm.services.sdei import EventSpec, Sdei
from tests import fuzzing
from tests.unit.fakes import machine


class ControlledMachine:
    def __init__(self) -> None:
        self.sdei = Sdei(machine(2, all_on=True).context(), [EventSpec(100)])
        self.stopped: list[str] = []

    def stop(self, message: str) -> None:
        self.stopped.append(message)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[ControlledMachine, str]]:
    vm = ControlledMachine()
    path = str(tmp_path / "vm.sock")
    server = ControlServer(path, vm.stop, vm.sdei)
    server.start()
    yield vm, path
    server.close()


def test_signal_status_and_stop(served: tuple[ControlledMachine, str], capsys: pytest.CaptureFixture[str]) -> None:
    vm, path = served
    assert request(path, {"cmd": "sdei-signal", "event": 100, "cpu": 1}) == {"ok": True, "pending": False}
    vm.sdei.pes[1].private[100].state = 1  # registered
    assert request(path, {"cmd": "sdei-signal", "event": 100, "cpu": 1})["pending"]
    assert cli.main(["sdei", "signal", "--control", path, "100", "--cpu", "1"]) == 0
    assert cli.main(["sdei", "signal", "--control", path, "100", "--cpu", "0"]) == 1  # unregistered
    assert cli.main(["sdei", "status", "--control", path]) == 0
    out = capsys.readouterr()
    assert "PEs: vcpu0 masked, vcpu1 masked" in out.out
    assert "event 100    vcpu1   normal   registered pending" in out.out
    assert "dropped: the guest has not registered it" in out.err
    assert cli.main(["stop", "--control", path]) == 0
    assert vm.stopped == ["stopped through the control socket"]


def test_bad_requests_get_one_line_errors(served: tuple[ControlledMachine, str],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    vm, path = served
    with pytest.raises(VmmError, match="no SDEI event 7"):
        request(path, {"cmd": "sdei-signal", "event": 7, "cpu": 0})
    with pytest.raises(VmmError, match="unknown command"):
        request(path, {"cmd": "reboot"})
    with pytest.raises(VmmError, match="integer event"):
        request(path, {"cmd": "sdei-signal", "event": "7"})
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        s.sendall(b"{not json\n")
        assert b"bad request" in s.recv(4096)
    assert cli.main(["sdei", "signal", "--control", path, "7", "--cpu", "0"]) == 1
    assert capsys.readouterr().err.startswith("pyvmm: error: there is no SDEI event 7")


def test_socket_path_is_claimed_carefully(tmp_path: Path) -> None:
    vm = ControlledMachine()
    path = tmp_path / "vm.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # nobody listens: taken over
    server = ControlServer(str(path), vm.stop, vm.sdei)
    server.start()
    with pytest.raises(VmmError, match="another VM is listening"):
        ControlServer(str(path), vm.stop, vm.sdei)
    server.close()
    assert not path.exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(VmmError, match="not a socket"):
        ControlServer(str(tmp_path / "file"), vm.stop, vm.sdei)
    with pytest.raises(VmmError, match="no VM listens"):
        request(str(path), {"cmd": "stop"})


def send_raw(path: str, data: bytes) -> bytes:
    """Send bytes as a client would, then read what comes back until the server closes."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(path)
        with contextlib.suppress(OSError):
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        out = b""
        with contextlib.suppress(OSError):
            while chunk := s.recv(4096):
                out += chunk
        return out


def test_a_deeply_nested_request_gets_an_error_and_the_socket_goes_on(served: tuple[ControlledMachine, str]) -> None:
    vm, path = served
    # Nested deeper than 3.11's parser goes (its recursion limit, 1000) but not 3.13's, as a
    # whole request or as a value inside one, well-formed or cut short: one reply on every Python
    deep = {"ok": False, "error": f"bad request: nested deeper than {MAX_DEPTH} levels"}
    for line in (b"[" * 2000 + b"]" * 2000, b"[" * 3000, b'{"cmd": ' + b"[" * 1500 + b"]" * 1500 + b"}",
                 b'{"cmd": "sdei-signal", "event": ' + b"[" * 40 + b"]" * 40 + b"}"):
        assert json.loads(send_raw(path, line + b"\n")) == deep
    # brackets in strings are not nesting; any JSON value but an object is refused as such
    assert json.loads(send_raw(path, b'{"cmd": "' + b"[" * 100 + b'"}\n'))["error"].startswith("unknown command")
    for line in (b"[1]", b'"stop"', b"{"):
        assert json.loads(send_raw(path, line + b"\n")) == {"ok": False, "error": NOT_AN_OBJECT}
    assert json.loads(send_raw(path, b"x" * 10_000 + b"\n"))["error"] == "bad request: longer than 4096 bytes"
    request(path, {"cmd": "stop"})
    assert vm.stopped == ["stopped through the control socket"]


def test_a_silent_client_holds_up_nobody(served: tuple[ControlledMachine, str]) -> None:
    vm, path = served
    with socket.socket(socket.AF_UNIX) as silent:
        silent.connect(path)  # and says nothing
        started = time.monotonic()
        request(path, {"cmd": "stop"})
        assert time.monotonic() - started < 2
    with socket.socket(socket.AF_UNIX) as gone:
        gone.connect(path)
        gone.sendall(b'{"cmd": "sto')  # and vanishes mid-line
    request(path, {"cmd": "stop"})
    assert vm.stopped == ["stopped through the control socket"] * 2


@pytest.mark.fuzz
@settings(max_examples=fuzzing.size(150, 5000), deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=600) | st.text(max_size=300).map(str.encode)
       | st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                      lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4),
                      max_leaves=20).map(lambda v: json.dumps(v).encode()))
def test_any_bytes_get_a_reply_or_a_closed_connection(served: tuple[ControlledMachine, str], data: bytes) -> None:
    vm, path = served
    out = send_raw(path, data + b"\n")
    reply = json.loads(out)  # every line, whatever it holds, gets a reply
    assert set(reply) <= {"ok", "error", "pending", "events", "masked"}
    assert request(path, {"cmd": "sdei-status"})["ok"]  # still serving
    fuzzing.tally("control socket").add("random requests")


def test_socket_paths_that_cannot_be_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    for path, message in ((str(tmp_path / "file" / "vm.sock"), "Not a directory"),
                          (str(tmp_path / "loop" / "vm.sock"), "Too many levels of symbolic links"),
                          (str(tmp_path / ("y" * 120)), "a Unix socket path is at most 107 bytes")):
        with pytest.raises(VmmError, match=message):
            ControlServer(path, lambda why: None, None)


def test_a_trickling_client_is_dropped_and_clients_are_bounded(served: tuple[ControlledMachine, str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """CLIENT_TIMEOUT bounds a whole request line, however slowly its bytes come; at most
    MAX_CLIENTS connections hold a thread, the ones beyond are closed at once."""
    from pyvmm.cli import control

    monkeypatch.setattr(control, "CLIENT_TIMEOUT", 1.0)
    vm, path = served
    with socket.socket(socket.AF_UNIX) as slow:
        slow.connect(path)
        started = time.monotonic()
        with contextlib.suppress(OSError):
            while time.monotonic() - started < 3:
                slow.sendall(b" ")  # one byte every 0.1 s: never a whole line
                time.sleep(0.1)
        assert time.monotonic() - started < 2.5  # closed on it (EPIPE) well before 3 s
    silent = [socket.socket(socket.AF_UNIX) for _ in range(control.MAX_CLIENTS)]
    try:
        for s in silent:
            s.connect(path)
        time.sleep(0.1)
        with socket.socket(socket.AF_UNIX) as extra:
            extra.connect(path)
            extra.settimeout(5)
            started = time.monotonic()
            assert extra.recv(1) == b""
            assert time.monotonic() - started < 0.5  # closed at once, not held until CLIENT_TIMEOUT
    finally:
        for s in silent:
            s.close()
    time.sleep(1.2)  # the silent ones have been dropped
    request(path, {"cmd": "stop"})
    assert vm.stopped == ["stopped through the control socket"]

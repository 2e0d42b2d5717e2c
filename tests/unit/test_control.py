"""The control socket: requests a person sends to a running VM, and what they get back."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvmm import cli
from pyvmm.control import ControlServer, request
from pyvmm.errors import VmmError
from pyvmm.services.sdei import EventSpec, Sdei
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

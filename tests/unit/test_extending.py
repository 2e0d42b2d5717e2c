"""Adding to pyvmm as its README ("Where things live") says: a virtio device with its own CLI
flag, and a subcommand, each a class or module of its own plus one registration line (here the
registration is made by the test). A service with its own device-tree node is
tests/kvm/test_extending.py's (it needs a VM)."""

from __future__ import annotations

import argparse
import types
from collections.abc import Callable

import pytest

from pyvmm import cli
from pyvmm.cli import app
from pyvmm.devices.virtio import registry
from pyvmm.devices.virtio.device import DeviceHost, VirtioDevice


class VirtioBalloon(VirtioDevice):
    """A new device type (virtio 1.2 §5.5), as a contributor would write its module: the class,
    its options, and what the options make."""

    device_id = 5
    name = "balloon"
    queue_sizes = (64, 64)

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--balloon", action="store_true", help="a virtio balloon")

    @classmethod
    def from_args(cls, args: argparse.Namespace, host: DeviceHost) -> list[VirtioDevice]:
        return [cls()] if args.balloon else []


class NoHost:
    def console_output(self, data: bytes) -> None: ...

    def use_console(self, receive: Callable[[bytes], None], kernel_name: str) -> None: ...


def test_a_virtio_device_brings_its_own_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SystemExit):  # before its registration line, `run` does not know the flag
        cli.build_parser().parse_args(["run", "-k", "Image", "--balloon"])
    monkeypatch.setattr(registry, "CLI_DEVICES", (*registry.CLI_DEVICES, VirtioBalloon))  # the line
    args = cli.build_parser().parse_args(["run", "-k", "Image", "--balloon"])
    made = [d for t in registry.CLI_DEVICES for d in t.from_args(args, NoHost())]
    assert [type(d) for d in made] == [VirtioBalloon]


def test_a_subcommand_is_a_module_and_its_line(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    def cmd_hello(args: argparse.Namespace, signals: object = None) -> int:
        print(f"hello {args.who}")
        return cli.EXIT_OK

    def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
        hello = sub.add_parser("hello", help="say hello")
        hello.add_argument("--who", default="world")
        hello.set_defaults(handler=cmd_hello)

    cmd_hello_module = types.SimpleNamespace(add_parser=add_parser)  # what pyvmm/cli/cmd_hello.py holds
    monkeypatch.setattr(app, "SUBCOMMANDS", (*app.SUBCOMMANDS, cmd_hello_module))  # the line
    assert cli.main(["hello", "--who", "pyvmm"]) == cli.EXIT_OK
    assert capsys.readouterr().out == "hello pyvmm\n"

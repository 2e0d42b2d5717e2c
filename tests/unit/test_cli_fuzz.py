"""Every CLI flag that takes a value, fed malformed values (hypothesis), in-process: each run
ends with status 0 and nothing on stderr (the value happened to be fine: `--dump-dtb` makes it
stop before a guest runs), or one deliberate error line and status 1 or 2; never a traceback, an
"internal error" (a pyvmm bug) or a hang. Service modules that raise, hang at import, return
garbage or fail to import get the same treatment."""

from __future__ import annotations

import argparse
import contextlib
import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvmm import cli
from pyvmm.services import modules as loader
from tests import fuzzing


def value_flags() -> list[tuple[str, ...]]:
    """(subcommand..., flag) for every option of every subcommand that takes a value."""
    found = []

    def walk(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, (*path, name))
            elif action.option_strings and action.nargs != 0:
                found.append((*path, action.option_strings[-1]))
    walk(cli.build_parser(), ())
    return found


FLAGS = value_flags()
EXAMPLES = fuzzing.size(400, 10_000)
# argv strings cannot hold NUL; surrogates cannot be encoded as a file name
text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=40)
malformed = st.one_of(
    text,
    st.integers(-2**70, 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(["", " ", "-1", "0", "0x", "1e999", "nan", "inf", "-", "--", ",", ",,", "=", "ro,ro",
                     "x,nolock,lock", "mode=tap", "mode=tap,tapif=", "mode=none,guest_mac=zz", "0xC3000000+",
                     "0xFFFFFFFF+2", "5-3", "shared,shared", "1,critical,bogus", ".", "/", "/dev/null",
                     "/proc/self/status", "a" * 5000]),
    st.lists(st.sampled_from(["mode=", "tap", "none", "tapif=", "guest_mac=", "ro", "nolock", ",", "=",
                              "0x", "+", "-", "shared", "critical", "00:11:22:33:44:55"]),
             max_size=6).map("".join),
)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A scratch cwd (relative paths a value names land here) with a flat guest in it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "guest.bin").write_bytes(b"\x00\x00\x00\x14" * 4)  # `b .`
    yield tmp_path


def run_in_process(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = cli.main(argv)
        except SystemExit as e:  # argparse's usage errors
            status = e.code if isinstance(e.code, int) else cli.EXIT_USAGE
    return status, err.getvalue()


def argv_for(flag: tuple[str, ...], value: str) -> list[str]:
    *command, option = flag
    if command == ["run"]:
        sdei = ["--sdei"] if option == "--sdei-event" else []  # else refused before its value is read
        return ["run", "-f", "guest.bin", "--dump-dtb", "out.dtb", *sdei, option, value]
    if command == ["exec"]:  # a kernel that is not there: nothing boots, whatever else is valid
        return ["exec", "--kernel", "no-such-kernel", "--timeout", "30", option, value, "--", "true"]
    if command == ["sdei", "signal"]:
        return ["sdei", "signal", "--control", "nowhere.sock", "1", option, value]
    return [*command, option, value]


def test_every_value_flag_is_covered() -> None:
    assert {f[-1] for f in FLAGS} >= {"--kernel", "--firmware", "--initrd", "--cpus", "--mem", "--disk", "--network",
                                      "--console", "--deny", "--sdei-event", "--service", "--control", "--timeout"}


@pytest.mark.fuzz
@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(flag=st.sampled_from(FLAGS), value=malformed)
def test_malformed_flag_values_get_one_line(workdir: Path, flag: tuple[str, ...], value: str) -> None:
    status, err = run_in_process(argv_for(flag, value))
    lines = err.strip().splitlines()
    assert "Traceback" not in err and "internal error" not in err, err
    if flag[0] == "exec":  # exec keeps 0-122 for its command: its own failures are 123-125
        assert status in (123, 124, cli.EXIT_EXEC_PYVMM) and len(lines) == 1, (status, err)
    elif status == cli.EXIT_OK:
        assert lines == [], err
    else:
        assert status in (cli.EXIT_ERROR, cli.EXIT_USAGE) and len(lines) == 1, (status, err)
    fuzzing.tally("CLI flags").add("malformed values")


SERVICE_BODIES = {
    "raises at import": "raise RuntimeError('boom')\n",
    "a syntax error": "def handle(call:\n",
    "an import that fails": "import nonexistent_module_for_pyvmm\n",
    "no RANGE": "def handle(call):\n    return 0\n",
    "RANGE of the wrong type": "RANGE = 'psci'\ndef handle(call):\n    return 0\n",
    "RANGE out of bounds": "RANGE = (0xFFFFFFFF, 2)\ndef handle(call):\n    return 0\n",
    "RANGE overlapping KVM's": "RANGE = (0x80000000, 1)\ndef handle(call):\n    return 0\n",
    "handle not callable": "RANGE = (0xC6000000, 1)\nhandle = 5\n",
    "exits at import": "import sys\nsys.exit(3)\n",
    "loops at import": "while True:\n    pass\n",
    "sleeps at import": "import time\ntime.sleep(3600)\n",
    "swallows exceptions at import": "import time\nwhile True:\n    try:\n        time.sleep(0.1)\n"
                                     "    except Exception:\n        pass\n",
}


@pytest.mark.fuzz
@pytest.mark.parametrize("what", list(SERVICE_BODIES))
def test_broken_service_modules_get_one_line(workdir: Path, what: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """(Handlers that return garbage: tests/unit/test_dispatcher.py; that never return: the KVM tier.)"""
    monkeypatch.setattr(loader, "LOAD_TIME_LIMIT", 0.5)
    (workdir / "service.py").write_text(SERVICE_BODIES[what])
    status, err = run_in_process(["run", "-f", "guest.bin", "--dump-dtb", "out.dtb", "--service", "service.py"])
    lines = err.strip().splitlines()
    assert "Traceback" not in err and "internal error" not in err, err
    assert status != cli.EXIT_OK and len(lines) == 1 and "service.py" in err, (status, err)
    fuzzing.tally("service modules").add("broken modules")

"""Device trees as dtc decompiles them, for tests that read a tree back with an independent tool.

dtc's spelling of a string list changed in 1.7.2 (Debian 13): `"a", "b"` where 1.6 (Debian 12)
wrote `"a\\0b"`. Both stand for the same bytes, a\\0b\\0, and `string_lists` reads either.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')


def decompile(dtb: bytes) -> str:
    dtc = shutil.which("dtc")
    if dtc is None:
        pytest.fail("dtc is missing: `make host-deps` installs device-tree-compiler")
    return subprocess.run([dtc, "-I", "dtb", "-O", "dts", "-q"], input=dtb, capture_output=True,
                          check=True).stdout.decode()


def string_lists(dts: str, name: str) -> list[list[str]]:
    """Every value of the string properties called `name`, each as its list of strings."""
    values = re.findall(rf'^\s*{re.escape(name)} = ((?:"(?:[^"\\]|\\.)*"(?:, )?)+);$', dts, re.M)
    return [[s for quoted in QUOTED.findall(value) for s in quoted.split("\\0")] for value in values]

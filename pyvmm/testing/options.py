"""The plugin's ini options, paths in the project, and time limits: what every fixture reads."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal, cast

import pytest

SCOPES = ("function", "class", "module", "package", "session")
Scope = Literal["function", "class", "module", "package", "session"]


# --- options, markers, the KVM requirement ---------------------------------------------------
def seconds(value: object, what: str) -> float:
    try:
        seconds = float(cast(Any, value))
    except (TypeError, ValueError):
        seconds = math.nan
    if not (seconds > 0 and math.isfinite(seconds)):
        raise pytest.UsageError(f"pyvmm: {what} must be a number of seconds above 0, not {value!r}")
    return seconds


def time_limit(item: pytest.Item) -> float:
    """The time limit of each guest run in `item`: its pyvmm_timeout marker, else the ini's."""
    marker = item.get_closest_marker("pyvmm_timeout")
    if marker is not None:
        value = marker.args[0] if marker.args else marker.kwargs.get("seconds")
        return seconds(value, "@pytest.mark.pyvmm_timeout(seconds)")
    return seconds(item.config.getini("pyvmm_timeout"), "ini option pyvmm_timeout")


def ini_base(config: pytest.Config) -> Path:
    return config.inipath.parent if config.inipath is not None else config.rootpath


def in_project(config: pytest.Config, path: str | os.PathLike[str]) -> Path:
    """A path a test names: as given when absolute, else under pytest's rootdir."""
    p = Path(path)
    return p if p.is_absolute() else config.rootpath / p


def linux_scope(fixture_name: str, config: pytest.Config) -> Scope:
    scope = str(config.getini("pyvmm_linux_scope")).strip() or "module"
    if scope not in SCOPES:
        raise pytest.UsageError(f"pyvmm: ini option pyvmm_linux_scope is one of {', '.join(SCOPES)}, not {scope!r}")
    return cast(Scope, scope)


def ini_int(config: pytest.Config, name: str) -> int:
    text = str(config.getini(name)).strip()
    try:
        value = int(text, 0)
    except ValueError:
        value = 0
    if value < 1:
        raise pytest.UsageError(f"pyvmm: ini option {name} must be a whole number above 0, not {text!r}")
    return value


def linux_options(config: pytest.Config) -> dict[str, Any]:
    """LinuxSession's arguments from the ini options."""
    kernel = str(config.getini("pyvmm_linux_kernel")).strip()
    modules = str(config.getini("pyvmm_linux_modules")).strip()
    return {
        "kernel": str(ini_base(config) / kernel) if kernel else None,
        "modules": str(ini_base(config) / modules) if modules else None,
        "cpus": ini_int(config, "pyvmm_linux_cpus"),
        "mem_mib": ini_int(config, "pyvmm_linux_mem"),
        "params": str(config.getini("pyvmm_linux_params")).strip(),
        "rwdirs": [str(p) for p in cast(list[Path], config.getini("pyvmm_linux_rwdirs"))],
    }



"""pyvmm's shape (README, "Where things live"): its modules import one another without a cycle,
so that each layer can be read, and tested, before the ones that build on it."""

from __future__ import annotations

import ast

from tests.conftest import ROOT


def module_imports() -> dict[str, set[str]]:
    """Each pyvmm module and the pyvmm modules it imports anywhere in it (at the top, inside
    functions, or only for the type checker)."""
    files = {}
    for path in (ROOT / "pyvmm").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    edges: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            # importing a.b.c runs a/__init__ and a/b/__init__ first
            wanted = {".".join(t.split(".")[:n]) for t in targets for n in range(2, t.count(".") + 2)}
            edges[name] |= {t for t in wanted if t in files and t != name and not name.startswith(t + ".")}
    return edges


def cycle_through(start: str, edges: dict[str, set[str]]) -> list[str] | None:
    """A path of imports from `start` back to itself, if there is one."""
    paths = [[start]]
    seen = {start}
    while paths:
        path = paths.pop()
        for after in sorted(edges[path[-1]]):
            if after == start:
                return [*path, start]
            if after not in seen:
                seen.add(after)
                paths.append([*path, after])
    return None


def test_no_module_imports_itself_through_others() -> None:
    edges = module_imports()
    assert "pyvmm.machine.vm" in edges and "pyvmm.kvm.fds" in edges["pyvmm.machine.vm"]
    cycles = [c for name in sorted(edges) if (c := cycle_through(name, edges))]
    assert cycles == [], " -> ".join(cycles[0])


def test_the_cycle_finder_finds_one() -> None:
    assert cycle_through("a", {"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle_through("a", {"a": {"b"}, "b": set()}) is None


MODULE_LINES, FUNCTION_LINES = 450, 60  # about what one reading takes in


def test_modules_and_functions_stay_readable_at_one_sitting() -> None:
    long_modules, long_functions = [], []
    for path in sorted((ROOT / "pyvmm").rglob("*.py")):
        text = path.read_text()
        if text.count("\n") > MODULE_LINES:
            long_modules.append(f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > FUNCTION_LINES:
                    long_functions.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {length} lines")
    assert long_modules == [] and long_functions == [], long_modules + long_functions


def test_the_names_users_import_still_work() -> None:
    """pyvmm.vm.Vm, pyvmm.boot.boot and pyvmm.cli's names stay where users found them; the payload
    builder's old module says it moved."""
    import warnings

    import pyvmm.boot
    import pyvmm.cli
    import pyvmm.machine.vm
    import pyvmm.vm
    from pyvmm.boot.load import boot
    from pyvmm.testing import payload

    assert pyvmm.vm.Vm is pyvmm.machine.vm.Vm and pyvmm.boot.boot is boot
    assert pyvmm.cli.EXIT_OK == 0 and callable(pyvmm.cli.main) and callable(pyvmm.cli.build_parser)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        import importlib
        import sys

        sys.modules.pop("pyvmm.payload", None)
        old = importlib.import_module("pyvmm.payload")
    assert old.main is payload.main and any(issubclass(w.category, DeprecationWarning) for w in said)


def test_a_service_sees_a_vcpu_through_methods_not_raw_buffers() -> None:
    """The service context's vCPU carries no cffi pointer or prepared ioctl: a call's result
    goes back through set_x0 (its fake needs no cffi memory), as crosvm's HypercallAbi returns
    results through a method."""
    from typing import get_type_hints

    from pyvmm.smccc.context import ServiceVcpu

    assert get_type_hints(ServiceVcpu) == {"index": int, "mpidr": int}
    assert callable(ServiceVcpu.set_x0)


def test_a_chain_has_one_form_the_host_iovec() -> None:
    """Every chain a queue gives a device is a host struct iovec (the general walk and the
    linear-table road alike), so a device serves a request one way."""
    import inspect

    from pyvmm.devices.virtio.rings.chain import Chain

    assert list(inspect.signature(Chain).parameters) == ["head", "iov", "nr_readable", "readable_len", "total", "ram"]

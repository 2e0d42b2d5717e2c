"""The host-side parts of `pyvmm exec` that need no guest: the initramfs (cpio, modules,
busybox), the scripts the guest runs, the environment and directory rules, the control
console's parser, and the CLI's own statuses."""

from __future__ import annotations

import lzma
import os
import queue
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from pyvmm import cli
from pyvmm.errors import VmmError
from pyvmm.exec import initramfs, shares
from pyvmm.exec import session as execute


def read_newc(data: bytes) -> dict[str, tuple[int, bytes, tuple[int, int]]]:
    """name -> (mode, body, rdev), read the way the kernel's unpacker does."""
    out: dict[str, tuple[int, bytes, tuple[int, int]]] = {}
    pos = 0
    while True:
        assert data[pos:pos + 6] == b"070701"
        f = [int(data[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = f[11], f[6]
        name = data[pos + 110:pos + 110 + namesize - 1].decode()
        pos = (pos + 110 + namesize + 3) & ~3
        body = data[pos:pos + filesize]
        pos = (pos + filesize + 3) & ~3
        if name == "TRAILER!!!":
            return out
        out[name] = (f[1], body, (f[9], f[10]))


def test_cpio_is_newc_the_kernel_can_unpack() -> None:
    a = initramfs.Cpio()
    a.directory("bin")
    a.file("init", b"#!/bin/sh\n", 0o755)
    a.file("bin/odd", b"xyz", 0o644)
    a.node("dev/console", 0o20600, 5, 1)
    entries = read_newc(a.finish())
    assert entries["init"] == (0o100755, b"#!/bin/sh\n", (0, 0))
    assert entries["bin/odd"][1] == b"xyz" and entries["bin"][0] == 0o40755
    assert entries["dev/console"] == (0o20600, b"", (5, 1))


def fake_module(path: Path, depends: str, compress: bool = True) -> None:
    body = b"\x7fELF...\0license=GPL\0depends=" + depends.encode() + b"\0name=x\0"
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        path.with_name(path.name + ".xz").write_bytes(lzma.compress(body))
    else:
        path.write_bytes(body)


def module_tree(root: Path) -> Path:
    fake_module(root / "kernel/drivers/virtio/virtio_mmio.ko", "")
    fake_module(root / "kernel/net/9p/9pnet_virtio.ko", "9pnet")
    fake_module(root / "kernel/net/9p/9pnet.ko", "", compress=False)
    fake_module(root / "kernel/fs/9p/9p.ko", "netfs,9pnet")
    fake_module(root / "kernel/fs/netfs/netfs.ko", "")
    (root / "modules.builtin").write_text("kernel/drivers/char/virtio_console.ko\n")
    return root


def test_modules_come_after_their_dependencies_and_builtins_are_skipped(tmp_path: Path) -> None:
    tree = initramfs.ModuleTree(module_tree(tmp_path))
    names = [m.name for m in tree.resolve()]
    assert names == ["virtio_mmio", "9pnet", "9pnet_virtio", "netfs", "9p"]  # virtio_rng: optional, absent
    assert initramfs.load_module(tree.files["9p"]).startswith(b"\x7fELF")  # .xz unpacked


def test_a_required_module_nowhere_is_one_clear_error(tmp_path: Path) -> None:
    module_tree(tmp_path)
    (tmp_path / "kernel/fs/9p/9p.ko.xz").unlink()
    with pytest.raises(VmmError, match="kernel module 9p is neither built into the kernel nor in"):
        initramfs.ModuleTree(tmp_path).resolve()
    assert initramfs.ModuleTree(None).resolve() == []  # no tree: everything must be built in


def elf(machine: int, interp: bool) -> bytes:
    header = bytearray(64)
    header[:5] = b"\x7fELF\x02"
    struct.pack_into("<H", header, 18, machine)
    struct.pack_into("<Q", header, 32, 64)  # e_phoff
    struct.pack_into("<HH", header, 54, 56, 2)  # e_phentsize, e_phnum
    phdrs = struct.pack("<I52x", 1) + struct.pack("<I52x", 3 if interp else 1)
    return bytes(header) + phdrs


def test_busybox_must_be_static_aarch64(tmp_path: Path) -> None:
    cases = {"static": (elf(183, False), None), "dynamic": (elf(183, True), "is dynamically linked"),
             "x86": (elf(62, False), "is not an AArch64 program"), "script": (b"#!/bin/sh\n" + bytes(60), "is not a 64-bit ELF")}
    for name, (data, problem) in cases.items():
        (tmp_path / name).write_bytes(data)
        found = initramfs._static_aarch64(str(tmp_path / name))
        assert (found is None) if problem is None else (found is not None and found.startswith(problem)), name


def run_script(script: bytes, tmp_path: Path) -> tuple[int, str, str]:
    """Run a command script with the host's sh and env in place of the guest's busybox; fd 4 is
    a file standing in for the control console."""
    text = script.replace(b"/run/pyvmm/busybox env", b"env")
    ctl = tmp_path / "ctl"
    p = subprocess.run(["sh", "-c", f"exec 4>{ctl}\n" + text.decode()], capture_output=True, text=True, timeout=30)
    return p.returncode, p.stdout, ctl.read_text()


def test_a_command_script_gives_exactly_its_argv_environment_and_directory(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "import os, sys; print(sys.argv[1:]); print(sorted(os.environ)); print(os.getcwd())",
            "a b", "it's", "$HOME", "new\nline", "-x"]
    env = {"PATH": os.environ["PATH"], "ODD": "x'y\"z $(no)"}
    status, out, ctl = run_script(execute.command_script(argv, env, str(tmp_path)), tmp_path)
    lines = out.splitlines()
    assert status == 0 and ctl == ""
    assert lines[0] == repr(["a b", "it's", "$HOME", "new\nline", "-x"])
    assert set(eval(lines[1])) <= {"ODD", "PATH", "LC_CTYPE"}  # Python may add LC_CTYPE
    assert lines[2] == str(tmp_path)


def test_a_directory_the_guest_lacks_is_reported_on_the_control_console(tmp_path: Path) -> None:
    status, out, ctl = run_script(execute.command_script(["true"], {}, str(tmp_path / "gone")), tmp_path)
    assert status == 1 and ctl.startswith("fail the working directory") and out == ""


@pytest.mark.parametrize("share, mount", [("9p", b"mount -t 9p -o trans=virtio"), ("fs", b"mount -t virtiofs")])
def test_the_setup_script_quotes_every_directory(share: str, mount: bytes) -> None:
    script = shares.setup_script(["/srv/with space", "/tmp/it's"], share)
    subprocess.run(["sh", "-n"], input=script, check=True)  # parses
    assert b"pyvmm-rw1 $R'/tmp/it'\"'\"'s'" in script
    assert script.count(mount) == 3  # the root and both directories


def test_exec_takes_virtio_fs_where_the_host_and_the_kernel_have_it(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from pyvmm.devices.virtio.vhost_user import virtiofsd

    tree = tmp_path / "modules"
    tree.mkdir()
    (tree / "modules.order").write_text("kernel/fs/fuse/fuse.ko\nkernel/fs/fuse/virtiofs.ko\n")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "modules.order").write_text("kernel/fs/9p/9p.ko\n")
    monkeypatch.setattr(virtiofsd, "find", lambda: "/usr/libexec/virtiofsd")
    assert shares.choose_share("auto", tree) == "fs"
    assert shares.choose_share("auto", bare) == "9p" and shares.choose_share("auto", None) == "9p"
    assert shares.choose_share("9p", tree) == "9p"
    monkeypatch.setattr(virtiofsd, "find", lambda: None)
    assert shares.choose_share("auto", tree) == "9p"
    with pytest.raises(VmmError, match="--share fs: virtiofsd is not installed"):
        shares.choose_share("fs", tree)


def test_what_the_guest_sees_of_the_host() -> None:
    assert execute.visible_in_guest("/work/main", [])
    assert not execute.visible_in_guest("/tmp/x", []) and not execute.visible_in_guest("/run", [])
    assert execute.visible_in_guest("/tmp/x/y", ["/tmp/x"]) and not execute.visible_in_guest("/tmp/xy", ["/tmp/x"])
    assert execute.visible_in_guest("/tmpfoo", [])


def test_the_environment_carried_and_added(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LC_TIME", "C")
    monkeypatch.setenv("SECRET_TOKEN", "s3")
    monkeypatch.setenv("MINE", "m")
    env = execute.chosen_env(["MINE", "NEW=v=w", "UNSET_ANYWHERE"])
    assert env["LC_TIME"] == "C" and env["MINE"] == "m" and env["NEW"] == "v=w"
    assert "SECRET_TOKEN" not in env and "UNSET_ANYWHERE" not in env
    for bad in ("=x", "1A=b", "A B=c"):
        with pytest.raises(VmmError, match="--env"):
            execute.chosen_env([bad])


def test_the_control_console_parser_bounds_what_a_guest_sends() -> None:
    s = object.__new__(execute.LinuxSession)
    s._line, s._events = bytearray(), queue.Queue(maxsize=256)
    s._control(b"x" * 100_000)
    assert len(s._line) == execute.CONTROL_LINE_MAX
    s._control(b"\n" + b"exit 1 0\n" * 10_000)
    assert s._events.qsize() == 256


@pytest.mark.parametrize(("args", "message"), [
    ([], "no command given"),
    (["--bogus", "--", "true"], "unrecognized arguments: --bogus"),
    (["--env", "=x", "--", "true"], "--env '=x'"),
    (["--rwdir", "/nonexistent-dir", "--", "true"], "--rwdir /nonexistent-dir is not a directory"),
    (["--cwd", "/tmp", "--", "true"], "--cwd /tmp is not a directory the guest sees"),
    (["-c", "0", "--", "true"], "'0' must be at least 1"),
    (["--modules", "/", "--", "true"], "give -k too"),
    (["--kernel", "--=", "--", "true"], "--kernel: expected one argument"),  # found by the CLI fuzz
    (["--time", "5", "--", "true"], "unrecognized arguments: --time"),  # spelled in full on every Python
    (["--timeout", "nan", "--", "true"], "must be positive"),
])
def test_exec_usage_errors_are_one_line_and_status_125(args: list[str], message: str,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    try:
        status = cli.main(["exec", *args])
    except SystemExit as e:  # argparse's own errors end in Parser.error
        status = int(e.code or 0)
    err = capsys.readouterr().err
    assert status == execute.EXIT_PYVMM_FAILED and message in err and len(err.splitlines()) == 1, err


def test_the_initramfs_is_cached_by_what_goes_into_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    busybox = tmp_path / "busybox"
    busybox.write_bytes(elf(183, False))
    monkeypatch.setattr(initramfs, "find_busybox", lambda: str(busybox))
    tree = module_tree(tmp_path / "modules")
    (tree / "modules.order").write_text("kernel/fs/9p/9p.ko\n")
    cache = tmp_path / "cache"
    first = initramfs.build(tree, cache=cache)
    entries = read_newc(first.read_bytes())
    assert entries["modules/order"][1] == b"virtio_mmio 9pnet 9pnet_virtio netfs 9p\n"
    assert entries["bin/busybox"][1] == busybox.read_bytes() and entries["init"][0] == 0o100755
    assert initramfs.build(tree, cache=cache) == first  # from the cache
    (tree / "modules.order").write_text("kernel/fs/9p/9p.ko\nkernel/fs/netfs/netfs.ko\n")  # a new kernel package
    assert initramfs.build(tree, cache=cache) != first


def test_captured_output_is_capped_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    monkeypatch.setattr(execute, "CAPTURE_MAX", 1000)
    s = object.__new__(execute.LinuxSession)
    s._sinks, s._lock = (None, None), threading.Lock()
    s._captured, s._truncated = (bytearray(), bytearray()), [False, False]
    for _ in range(50):
        s._output(0, b"y" * 100)  # `yes` in the guest
    s._output(1, b"short")
    assert len(s._captured[0]) == 1000 and s._truncated == [True, False] and bytes(s._captured[1]) == b"short"

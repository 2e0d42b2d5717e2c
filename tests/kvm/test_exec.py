"""`pyvmm exec` and LinuxSession on real KVM: a Linux guest on the host's root (read-only,
virtio-fs through virtiofsd, and virtio-9p: every test runs on each), the command's streams and
status, --rwdir, and the share's confinement.

The kernel is the default one, as a user gets it: the running kernel and its modules (in the
emulated host, its bundled Debian kernel, kept at /boot and /lib/modules as on any Debian host).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvmm.errors import VmmError
from pyvmm.exec.session import LinuxSession, default_kernel
from tests.conftest import ROOT, errors, linux_guest
from tests.kvm.conftest import NEEDS_SHARED_RAM

BOOT_LIMIT = 150  # seconds for one boot to the command, in the emulated host (about 20 s there)


def kernel_options() -> list[str]:
    """None where the running kernel's image is there (the emulated host, an arm64 machine);
    in a container without it (a CI runner's), the bundled Debian kernel and its module tree."""
    try:
        default_kernel()
        return []
    except VmmError:
        image, _ = linux_guest()
        return ["-k", str(image), "--modules", str(image.parent.parent / "modules")]


SHARE = ["fs"]  # the share the module's tests run on now (the `share` fixture sets it)


@pytest.fixture(scope="module", autouse=True, params=[pytest.param("fs", marks=NEEDS_SHARED_RAM), "9p"])
def share(request: pytest.FixtureRequest) -> str:
    """Every test here runs with the host's files over virtio-fs and over virtio-9p."""
    SHARE[0] = request.param
    return str(request.param)


def pyvmm_exec(*args: str, timeout: float = BOOT_LIMIT) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "pyvmm", "exec", "--share", SHARE[0], *kernel_options(), *args],
                          capture_output=True, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    """A host directory the guest sees through its root share (not under /tmp, which is the
    guest's own tmpfs)."""
    where = ROOT / "build" / "exec-test"
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    yield where
    shutil.rmtree(where, ignore_errors=True)


# The streams, the status and the time limit go over virtio consoles whatever carries the files:
# these two run on the default share only.
@pytest.mark.parametrize("share", [pytest.param("fs", marks=NEEDS_SHARED_RAM)], indirect=True)
def test_stdout_stderr_and_status_are_the_commands(share: str) -> None:
    p = pyvmm_exec("--", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert (p.returncode, p.stdout, p.stderr) == (7, b"out\n", b"err\n")


def test_a_random_mebibyte_through_stdout_arrives_byte_exact(scratch: Path) -> None:
    data = os.urandom(1 << 20)
    (scratch / "random.bin").write_bytes(data)
    p = pyvmm_exec("--", "cat", str(scratch / "random.bin"))
    assert p.returncode == 0 and errors(p.stderr) == []
    assert p.stdout == data


def test_signal_status_and_rwdir_files_after_exit(scratch: Path, share: str) -> None:
    """Through the CLI: a command killed by SIGKILL gives 128 + 9, and what it wrote under
    --rwdir is on the host once pyvmm has exited."""
    out = scratch / f"rw-{share}"
    out.mkdir()
    p = pyvmm_exec("--rwdir", str(out), "--", "sh", "-c", f"echo kept > {out}/file; kill -KILL $$")
    assert p.returncode == 128 + signal.SIGKILL, p.stderr
    assert (out / "file").read_text() == "kept\n"


@pytest.mark.parametrize("share", [pytest.param("fs", marks=NEEDS_SHARED_RAM)], indirect=True)
def test_timeout_gives_124_and_one_line(share: str) -> None:
    p = pyvmm_exec("--timeout", "25", "--", "sleep", "1000", timeout=120)
    assert p.returncode == 124
    assert p.stdout == b"" and p.stderr.decode().strip() == "pyvmm: timed out after 25 s"


def test_a_missing_kernel_is_pyvmm_s_own_status(scratch: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "pyvmm", "exec", "-k", str(scratch / "no-such-Image"), "--", "true"],
                       capture_output=True, timeout=60)
    assert p.returncode == 125 and b"no-such-Image" in p.stderr and len(errors(p.stderr)) == 1


@pytest.fixture(scope="module")
def session(scratch: Path, tmp_path_factory: pytest.TempPathFactory,
            share: str) -> Iterator[tuple[LinuxSession, Path, Path]]:
    """One guest for the session tests: --rwdir on a host directory under /tmp (so the guest
    sees it only through its own share), whose parent holds a secret no share reaches."""
    hidden = tmp_path_factory.mktemp("hidden")
    (hidden / "secret.txt").write_text("the host's secret\n")
    rw = hidden / "rw"
    rw.mkdir()
    (rw / "abs").symlink_to(hidden)
    (rw / "rel").symlink_to("..")
    kernel = kernel_options()
    s = LinuxSession(rwdirs=[str(rw)], kernel=kernel[1] if kernel else None, modules=kernel[3] if kernel else None,
                     share=share)
    try:
        s.start(timeout=BOOT_LIMIT)
        yield s, rw, hidden
    finally:
        s.close()


def test_a_host_file_reads_the_same_in_the_guest(session: tuple[LinuxSession, Path, Path], scratch: Path) -> None:
    s, _, _ = session
    blob = os.urandom(1 << 20) + b"tail"
    (scratch / "blob").write_bytes(blob)
    done = s.run(["sha256sum", str(scratch / "blob")], timeout=60)
    assert done.status == 0, done.stderr
    assert done.stdout.split()[0].decode() == hashlib.sha256(blob).hexdigest()


def test_writes_under_rwdir_reach_the_host(session: tuple[LinuxSession, Path, Path]) -> None:
    s, rw, _ = session
    done = s.run(f"mkdir -p {rw}/made && printf 'from the guest' > {rw}/made/file && ln -s file {rw}/made/link "
                 f"&& mv {rw}/made/file {rw}/made/moved && sync", timeout=60)
    assert done.status == 0, done.stderr
    assert (rw / "made" / "moved").read_text() == "from the guest"
    assert os.readlink(rw / "made" / "link") == "file"


def test_writes_elsewhere_on_the_root_fail(session: tuple[LinuxSession, Path, Path], scratch: Path,
                                          share: str) -> None:
    s, _, _ = session
    fstype = {"fs": "virtiofs", "9p": "9p"}[share]
    for target in (scratch / "nope", ROOT / "nope", Path("/nope")):
        done = s.run(["sh", "-c", f"echo x > {target}"], timeout=60)
        assert done.status != 0 and b"Read-only file system" in done.stderr, (target, done)
        assert not target.exists()
    done = s.run(["sh", "-c", f"mkdir {scratch}/d || rm {scratch}/blob || touch {scratch}"], timeout=60)
    assert done.status != 0 and (scratch / "blob").exists()
    # the guest's root remounted read-write: the server (virtiofsd --readonly, or pyvmm's) refuses
    done = s.run(["sh", "-c", f"mount -o remount,rw / && grep -q ' / {fstype} rw' /proc/mounts && echo x > {scratch}/nope"],
                 timeout=60)
    assert done.status != 0 and b"Read-only file system" in done.stderr, done
    assert not (scratch / "nope").exists()


def test_escapes_out_of_a_share_fail(session: tuple[LinuxSession, Path, Path]) -> None:
    """What a user sees: a --rwdir share's symlinks and .. are the guest's to resolve, in its
    own tree (where the host's /tmp is a fresh tmpfs), so neither reads nor writes through
    them reach the directory beside the share. (Linux never asks the server to follow a
    symlink or walk ..; the server's own refusals are tests/unit/test_ninep.py's.)"""
    s, rw, hidden = session
    for path in (f"{rw}/abs/secret.txt", f"{rw}/rel/secret.txt", f"{rw}/../secret.txt", f"{hidden}/secret.txt"):
        done = s.run(["cat", path], timeout=60)
        assert done.status != 0 and b"secret" not in done.stdout, (path, done)
    done = s.run(["sh", "-c", f"echo pwned > {rw}/rel/secret.txt; echo pwned > {rw}/abs/new"], timeout=60)
    assert (hidden / "secret.txt").read_text() == "the host's secret\n"
    assert not (hidden / "new").exists()


def test_a_command_killed_by_a_signal_gives_128_plus_n(session: tuple[LinuxSession, Path, Path]) -> None:
    s, _, _ = session
    assert s.run("kill -TERM $$", timeout=60).status == 128 + signal.SIGTERM
    assert s.run("kill -KILL $$", timeout=60).status == 128 + signal.SIGKILL


def test_environment_and_directory_are_carried(session: tuple[LinuxSession, Path, Path], scratch: Path) -> None:
    s, _, _ = session
    done = s.run(["sh", "-c", 'pwd; echo "$GREETING"; env'], env={"GREETING": "a b\n'c'", "PATH": "/bin:/usr/bin"},
                 cwd=str(scratch), timeout=60)
    assert done.status == 0, done.stderr
    lines = done.stdout.decode().split("\n")
    assert lines[0] == str(scratch) and lines[1:3] == ["a b", "'c'"]
    assert "PATH=/bin:/usr/bin" in lines and not any(x.startswith(("HOME=", "PYTHONPATH=")) for x in lines)


def test_binary_stderr_and_unrelated_streams_stay_apart(session: tuple[LinuxSession, Path, Path]) -> None:
    s, _, _ = session
    done = s.run("printf '\\000\\377\\r\\n' >&2; printf 'a\\rb\\n'", timeout=60)
    assert (done.status, done.stdout, done.stderr) == (0, b"a\rb\n", b"\x00\xff\r\n")

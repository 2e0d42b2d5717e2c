"""virtio-9p as Linux uses it: a file the guest caches (cache=loose) is read in msize-sized
requests and read again from the guest's page cache, which Linux >= 6.4 does only for a qid whose
version is not 0 (fs/9p/fid.h, v9fs_fid_add_modes); and, on a coherent mount, a file the host
changes is read anew. The server's request count is the first one's witness (LinuxSession's 9p
root). That each qid's version changes with its file is tests/unit/test_ninep.py's."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvmm.exec.session import LinuxSession
from pyvmm.machine.vm import Vm
from tests.conftest import ROOT
from tests.kvm.test_exec import BOOT_LIMIT, kernel_options

MIB = 4


@pytest.fixture(scope="module")
def where() -> Iterator[Path]:
    d = ROOT / "build" / "ninep-linux"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def session(where: Path) -> Iterator[LinuxSession]:
    from pyvmm.devices.virtio.p9 import Virtio9p

    def side_share(vm: Vm) -> None:  # the same directory once more, for a mount of the test's choosing
        vm.add_virtio(Virtio9p(str(where), "side"))

    kernel = kernel_options()
    s = LinuxSession(kernel=kernel[1] if kernel else None, modules=kernel[3] if kernel else None, share="9p",
                     configure=side_share)
    try:
        s.start(timeout=BOOT_LIMIT)
        yield s
    finally:
        s.close()


def test_a_loose_file_is_read_in_large_requests_then_from_the_guests_cache(session: LinuxSession,
                                                                          where: Path) -> None:
    big = where / "big.bin"
    big.write_bytes(os.urandom(MIB << 20))
    root = session.root_share
    assert root is not None  # the 9p root, mounted cache=loose
    before = root.requests
    done = session.run(f"dd if={big} of=/dev/null bs=1M", timeout=120)
    assert done.status == 0, done.stderr
    first = root.requests - before
    # Linux reads ahead in large requests (with dd's own lookups and opens, some 12 per MiB in
    # Linux 6.12), where a qid version of 0 has it read around its cache, 4 KiB per request: 256
    assert first <= MIB * 32, first
    before = root.requests
    done = session.run(f"dd if={big} of=/dev/null bs=1M", timeout=120)
    assert done.status == 0, done.stderr
    # the binary's and the file's opens and closes; the data came from the guest's page cache
    assert root.requests - before <= MIB * 4, root.requests - before


def test_a_coherent_mount_reads_what_the_host_changed(session: LinuxSession, where: Path) -> None:
    """cache=mmap (Linux keeps a file's pages only while it is in use, and looks its name up again
    at each open): a host change made between two of the guest's reads is what the second reads.
    The README's table of cache modes says which mode is safe for what."""
    (where / "f").write_text("one\n")
    done = session.run("mkdir -p /tmp/side && mount -t 9p -o trans=virtio,version=9p2000.L,cache=mmap side /tmp/side"
                       " && cat /tmp/side/f", timeout=60)
    assert (done.status, done.stdout) == (0, b"one\n"), done.stderr
    (where / "f").write_text("two\n")  # the same size: only the contents (and the time) tell
    done = session.run("cat /tmp/side/f", timeout=60)
    assert (done.status, done.stdout) == (0, b"two\n"), done.stderr

"""virtiofsd, the virtio-fs daemon (Rust; Debian 13 and Ubuntu 24.04 package it as `virtiofsd`),
started by pyvmm for `--fs DIR,TAG` and `pyvmm exec --share fs`.

pyvmm makes the listening socket itself and hands it over with `--fd` (daemon.py). The daemon
serves that one connection and exits when pyvmm closes it. Its sandbox is the strongest it can set up for pyvmm's user (sandboxes(); fs.py tries them in
turn): a mount namespace confined to the shared directory (`--sandbox namespace`, the default;
unprivileged, it makes a user namespace), a chroot for root where namespaces are refused or / is
an initramfs, or, where the host refuses namespaces to another user, none (`--sandbox none`).
"""

from __future__ import annotations

import os
import shutil

from pyvmm.devices.virtio.vhost_user.daemon import Daemon
from pyvmm.errors import VmmError

# Debian's place for it, and QEMU's older one; $PYVMM_VIRTIOFSD or PATH first
PLACES = ("/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd")
CACHE_MODES = ("auto", "always", "never", "metadata")


def find() -> str | None:
    """The virtiofsd to run, or None where there is none."""
    chosen = os.environ.get("PYVMM_VIRTIOFSD")
    if chosen:
        return chosen if os.access(chosen, os.X_OK) else None
    found = shutil.which("virtiofsd")
    if found:
        return found
    return next((p for p in PLACES if os.access(p, os.X_OK)), None)


def sandboxes(root_user: bool, rootfs: bool) -> tuple[str, ...]:
    """The sandboxes to try, strongest first; the next is tried when a daemon ends before it
    answers. Root gets namespaces, or a chroot where it is refused them (a container without
    CAP_SYS_ADMIN) or on a host running from its initramfs, whose root pivot_root(2) cannot
    move (EINVAL). Another user may be refused namespaces, and then has none."""
    if root_user:
        return ("chroot",) if rootfs else ("namespace", "chroot")
    return ("namespace", "none")


def root_is_rootfs(mountinfo: str = "/proc/self/mountinfo") -> bool:
    """Whether / is the kernel's initial rootfs (an initramfs never switched away from)."""
    try:
        with open(mountinfo) as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and fields[4] == "/" and " - " in line:
                    return line.split(" - ", 1)[1].split()[0] == "rootfs"
    except OSError:
        pass
    return False


class Virtiofsd(Daemon):
    """One virtiofsd serving `shared_dir` on a fresh socket (`socket_path`), in `sandbox`."""

    def __init__(self, shared_dir: str, *, read_only: bool, cache: str = "auto", sandbox: str = "namespace",
                 what: str = "virtio-fs") -> None:
        binary = find()
        if binary is None:
            raise VmmError(f"{what}: virtiofsd is not installed or not executable (Debian 13 and Ubuntu 24.04: "
                           "apt install virtiofsd; or set PYVMM_VIRTIOFSD)")
        if not os.path.isdir(shared_dir):
            raise VmmError(f"{what}: {shared_dir} is not a directory")
        if cache not in CACHE_MODES:
            raise VmmError(f"{what}: cache {cache!r} is not one of {', '.join(CACHE_MODES)}")
        super().__init__("pyvmm-virtiofsd-")
        self.what, self.sandbox = what, sandbox
        args = [binary, f"--shared-dir={shared_dir}", f"--cache={cache}", f"--sandbox={sandbox}", "--log-level=error"]
        if read_only:
            args.append("--readonly")
        self.start(lambda fd: [*args, f"--fd={fd}"], what)  # stop() waits: it ends with pyvmm's connection

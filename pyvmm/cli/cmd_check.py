"""`pyvmm check`: what this host's KVM offers pyvmm."""

from __future__ import annotations

import argparse
import errno
import os
from pathlib import Path
from typing import Any

from pyvmm.cli.options import EXIT_ERROR, EXIT_OK


def add_parser(sub: Any) -> None:
    """This subcommand's parser, on `pyvmm`'s subparsers."""
    check = sub.add_parser("check", help="report what this host's KVM offers pyvmm")
    check.set_defaults(handler=cmd_check)


def exec_share_line() -> str:
    """Which share `pyvmm exec --share auto` takes on this host, and why."""
    from pyvmm.devices.virtio.vhost_user import virtiofsd
    from pyvmm.exec.initramfs import kernel_offers
    from pyvmm.exec.shares import choose_share

    modules = f"/lib/modules/{os.uname().release}"
    tree = Path(modules) if os.path.isdir(modules) else None
    found = virtiofsd.find()
    if choose_share("auto", tree) == "fs":
        return f"exec's files    virtio-fs, through {found}"
    why = ("no virtiofsd (Debian 13, Ubuntu 24.04: apt install virtiofsd)" if found is None
           else f"this kernel has no virtiofs module under {modules}" if not kernel_offers(tree, "virtiofs") else "")
    return f"exec's files    virtio-9p ({why})"


def shared_thp_line(path: str = "/sys/kernel/mm/transparent_hugepage/shmem_enabled") -> str:
    """Whether guest RAM shared with a vhost-user daemon (a memfd) gets transparent huge pages."""
    try:
        with open(path) as f:
            mode = next((w.strip("[]") for w in f.read().split() if w.startswith("[")), "never")
    except OSError:
        mode = "never"
    if mode in ("advise", "always", "within_size", "force"):
        return f"shared RAM      transparent huge pages ({path}: {mode})"
    return (f"shared RAM      small pages only ({path}: {mode}; advise gives virtio-fs guests huge pages, "
            "which boot faster)")


def vhost_refusal(path: str, module: str) -> str | None:
    """Why the kernel vhost device at `path` does not open for pyvmm, or None if it does."""
    from pyvmm.errors import VmmError
    from pyvmm.kvm.fds import VhostFd

    try:
        VhostFd(path).close()
    except OSError as e:
        hint = {errno.ENOENT: f"load {module}", errno.EACCES: "pyvmm's user may not open it"}.get(e.errno or 0, "")
        return f"{path}: {e.strerror}{'; ' + hint if hint else ''}"
    except VmmError as e:
        return f"{path}: {e}"
    return None


def vhost_net_line(path: str = "/dev/vhost-net") -> str:
    """Whether a tap NIC's frames move in the kernel (vhost-net) or through pyvmm."""
    why = vhost_refusal(path, "vhost_net")
    if why is not None:
        return f"tap NICs        pyvmm moves the frames ({why})"
    return f"tap NICs        the kernel's vhost-net moves the frames ({path})"


def vsock_line(path: str = "/dev/vhost-vsock") -> str:
    """Whether --vsock works (it needs the kernel's vhost-vsock)."""
    why = vhost_refusal(path, "vhost_vsock")
    if why is not None:
        return f"--vsock         unavailable ({why})"
    return f"--vsock         guest sockets through the kernel's vhost-vsock ({path})"


def disks_line(kernel: str | None = None, cpuinfo: str = "/proc/cpuinfo") -> str:
    """Whether `-d FILE,backend=qsd` works here (pyvmm's worker serves every other disk)."""
    from pyvmm.devices.virtio.vhost_user import storage_daemon
    from pyvmm.devices.virtio.vhost_user_blk import host_has_mte, shared_ram_refusal, worker_reason

    found = storage_daemon.find()
    refusal = shared_ram_refusal(kernel or os.uname().release, host_has_mte(cpuinfo))
    why = worker_reason(found, refusal)
    if why is None:
        return f"disks (-d)      pyvmm's worker; backend=qsd: qemu-storage-daemon over vhost-user ({found})"
    if found is not None:  # an MTE guest only: --disable-mte gives it the daemon
        return f"disks (-d)      pyvmm's worker; backend=qsd: not for guests with MTE ({why})"
    return f"disks (-d)      pyvmm's worker; backend=qsd: unavailable ({why})"


def cmd_check(args: argparse.Namespace, signals: object = None) -> int:
    """The host's shape and, in words, what pyvmm can and cannot do on it (pyvmm/machine/host.py)."""
    from pyvmm.machine.host import probe, report, runnable

    uname = os.uname()
    if uname.machine != "aarch64":
        print(f"kernel          {uname.release} {uname.machine}")
        print(f"pyvmm runs guests on arm64 hosts with KVM; this host is {uname.machine}. "
              "`make demo` and `make test` run pyvmm inside an emulated arm64 host here.")
        return EXIT_ERROR
    shape = probe()
    for line in report(shape):
        print(line)
    print(exec_share_line())
    print(shared_thp_line())
    print(vhost_net_line())
    print(vsock_line())
    print(disks_line())
    return EXIT_OK if runnable(shape) else EXIT_ERROR

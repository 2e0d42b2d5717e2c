"""Unix socket paths a server of pyvmm's is about to bind (the control socket, the GDB stub's):
claimed before the VM is built, so that a bad path costs nothing, and a stale socket removed."""

from __future__ import annotations

import errno
import os
import socket
import stat

from pyvmm.errors import VmmError

SUN_PATH_MAX = 108  # sizeof(struct sockaddr_un.sun_path) on Linux


def claim(path: str, option: str = "--control") -> None:
    """Make room for the socket: a stale socket (nobody listening) is removed; anything else
    at `path`, or a path a Unix socket cannot have (sun_path: 108 bytes with its NUL, unix(7)),
    is an error. The CLI calls this before it builds the VM, so a bad --control costs nothing."""
    if len(os.fsencode(path)) >= SUN_PATH_MAX:
        raise VmmError(f"{option} {path}: a Unix socket path is at most {SUN_PATH_MAX - 1} bytes")
    parent = os.path.dirname(path) or "."
    if not os.path.lexists(parent):  # bind() would fail only once the VM is built
        raise VmmError(f"{option} {path}: there is no directory {parent}")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as e:  # a name too long, a file used as a directory, no permission
        raise VmmError(f"{option} {path}: {e.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise VmmError(f"{option} {path}: a file that is not a socket is in the way")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as e:
        if e.errno != errno.ECONNREFUSED:
            raise VmmError(f"{option} {path}: {e.strerror or e}") from None
        os.unlink(path)  # stale: its VM is gone
        return
    finally:
        probe.close()
    raise VmmError(f"{option} {path}: another VM is listening there")

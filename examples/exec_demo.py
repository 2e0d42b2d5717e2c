"""`pyvmm exec`: a host command in a Linux guest whose root is the host's (read-only, over
virtio-9p), with the command's stdout, stderr and exit status as pyvmm's own.

    python3 examples/exec_demo.py      (on an arm64 host with KVM; `make demo` runs it)
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def kernel_options() -> list[str]:
    """None: the running kernel (pyvmm exec's default). Where its image is not there (a
    container), the Debian kernel `make` fetched for the tests, with its modules."""
    if os.path.isfile(f"/boot/vmlinuz-{os.uname().release}"):
        return []
    bundled = ROOT / ".cache" / "armhost"
    print(f"(no /boot/vmlinuz-{os.uname().release} here: using the bundled Debian kernel)")
    return ["-k", str(bundled / "guest" / "Image"), "--modules", str(bundled / "modules")]


def pyvmm_exec(*argv: str) -> subprocess.CompletedProcess[bytes]:
    command = [sys.executable, "-m", "pyvmm", "exec", *kernel_options(), "--timeout", "300", "--", *argv]
    print("$ pyvmm exec -- " + " ".join(argv), flush=True)
    return subprocess.run(command, capture_output=True, timeout=400)


def main() -> int:
    print(f"host:  {' '.join(os.uname())}")
    with open(sys.executable, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    p = pyvmm_exec("sh", "-c", f"uname -a; sha256sum {sys.executable}; echo 'this goes to stderr' >&2; exit 3")
    lines = p.stdout.decode().splitlines()
    guest_digest = lines[1].split()[0] if len(lines) > 1 else ""
    print(f"guest: {lines[0] if lines else ''}")
    print(f"  stdout: {' | '.join(lines)}")
    print(f"  stderr: {p.stderr.decode().strip()}")
    print(f"  status: {p.returncode}")
    print(f"the guest read {sys.executable} through 9p: its checksum "
          f"{'matches' if guest_digest == digest else 'DIFFERS from'} the host's")
    ok = p.returncode == 3 and guest_digest == digest and p.stderr == b"this goes to stderr\n"
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

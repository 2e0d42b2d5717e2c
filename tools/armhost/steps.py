"""The external programs the build runs (apt, pip, dpkg-deb, cpio...): a failed one ends the run
with one line naming the step and a non-zero exit status, never a Python traceback."""

from __future__ import annotations

import subprocess
import sys
from typing import Any


def log(msg: str) -> None:
    print(f"armhost: {msg}", file=sys.stderr, flush=True)


def run_step(what: str, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
    """subprocess.run(argv, **kwargs) for the step `what`; exits (SystemExit) if it fails.

    The program's own error output has been shown already (or is shown here if it was captured);
    the last line then says which step failed.
    """
    try:
        proc = subprocess.run(argv, **kwargs)
    except OSError as e:
        raise SystemExit(f"armhost: {what} failed: cannot run {argv[0]}: {e.strerror}") from None
    if proc.returncode != 0:
        err = proc.stderr
        if err:
            sys.stderr.write(err if isinstance(err, str) else err.decode(errors="replace"))
        raise SystemExit(f"armhost: {what} failed ({argv[0].rsplit('/', 1)[-1]} exited with status "
                         f"{proc.returncode})")
    return proc

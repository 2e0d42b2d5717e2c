"""`python -m pyvmm.payload` and `pyvmm.payload`, their old names: pyvmm.testing.payload's now.
Importing it says so (DeprecationWarning); it will go in a later release."""

from __future__ import annotations

import sys
import warnings

from pyvmm.testing.payload import CACHE_ENV, PayloadCache, PayloadError, main

__all__ = ["CACHE_ENV", "PayloadCache", "PayloadError", "main"]

warnings.warn("pyvmm.payload is pyvmm.testing.payload now", DeprecationWarning, stacklevel=2)

if __name__ == "__main__":
    sys.exit(main())

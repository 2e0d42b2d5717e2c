"""`pyvmm exec`: a Linux guest that runs one command in the host's filesystem (session.py), and
the initramfs it boots (initramfs.py)."""

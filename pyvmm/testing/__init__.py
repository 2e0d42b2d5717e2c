"""What pyvmm's users test with, and pyvmm tests itself with: payloads assembled from .S files
(payload.py)."""

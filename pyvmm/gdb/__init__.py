"""A GDB remote stub for pyvmm guests: the remote serial protocol's packets (packets.py) and the
guest's stage-1 translation that GDB's virtual addresses need (stage1.py)."""

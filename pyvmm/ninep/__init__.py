"""9P2000.L: the wire format (protocol.py) and a file server on a host directory (server.py),
for the virtio-9p device (pyvmm/devices/virtio/p9.py)."""

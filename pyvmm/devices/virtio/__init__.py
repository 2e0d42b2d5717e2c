"""virtio-mmio devices: the transport (transport.py), split virtqueues (rings/), the device model
base (device.py), one module per device type, and the types `pyvmm run` offers (registry.py)."""

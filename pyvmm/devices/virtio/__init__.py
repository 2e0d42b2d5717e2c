"""virtio-mmio devices: the transport (mmio.py), split virtqueues (queue.py), the device model
base (device.py) and one module per device type."""

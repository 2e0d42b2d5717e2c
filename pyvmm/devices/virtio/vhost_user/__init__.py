"""vhost-user: virtio devices whose rings a daemon serves (pyvmm is the front-end)."""

"""Virtqueues in guest memory (virtio 1.2 §2.7): the split ring (queue.py), a request's chain of
descriptors (chain.py, linear_table.py), their layout (layout.py), the buffers they describe
(buffers.py) and the memory barriers between device and driver (barrier.py)."""

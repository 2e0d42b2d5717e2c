"""Split-virtqueue structures in guest memory (virtio 1.2 §2.7), and the host's struct iovec."""

from __future__ import annotations

import struct

# struct virtq_desc: le64 addr, le32 len, le16 flags, le16 next (§2.7.5)
DESC = struct.Struct("<QIHH")
DESC_SIZE = DESC.size
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
# struct virtq_used_elem: le32 id, le32 len (§2.7.8)
USED_ELEM = struct.Struct("<II")
VIRTQ_AVAIL_F_NO_INTERRUPT = 1  # §2.7.7
MAX_QUEUE_SIZE = 32768  # §2.7: a split queue's size is a power of 2, at most 32768
IOVEC = struct.Struct("<QQ")  # struct iovec on LP64: void *iov_base, size_t iov_len

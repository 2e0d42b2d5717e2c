"""C declarations from include/uapi/linux/vhost_types.h (Linux 6.12): what the kernel's vhost
devices (/dev/vhost-net, /dev/vhost-vsock) take; the ioctls are in ioctls.py."""

CDEF = """
struct vhost_vring_state {
    unsigned int index;
    unsigned int num;
};

struct vhost_vring_file {
    unsigned int index;
    int fd;                             /* -1: unbind */
};

struct vhost_vring_addr {
    unsigned int index;
    unsigned int flags;                 /* VHOST_VRING_F_LOG */
    uint64_t desc_user_addr;
    uint64_t used_user_addr;
    uint64_t avail_user_addr;
    uint64_t log_guest_addr;
};

struct vhost_memory_region {
    uint64_t guest_phys_addr;
    uint64_t memory_size;
    uint64_t userspace_addr;
    uint64_t flags_padding;
};

struct vhost_memory {
    uint32_t nregions;
    uint32_t padding;
    struct vhost_memory_region regions[];
};
"""

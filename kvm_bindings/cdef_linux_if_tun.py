"""The tap device's UAPI: struct ifreq as TUNSETIFF takes it (include/uapi/linux/if.h; the
ioctls and IFF_* flags are in include/uapi/linux/if_tun.h, see ioctls.py and constants.py)."""

CDEF = """
struct ifreq {
    char ifr_name[16];                  /* IFNAMSIZ */
    union {
        short ifr_flags;
        int ifr_ifindex;
        char ifr_pad[24];               /* the union's size: struct ifmap */
    };
};
"""

"""libc functions called through cffi.

ioctl is declared with a pointer third argument rather than as variadic: calling a variadic
function in ABI mode is not portable, and every KVM ioctl takes either a pointer or an integer
that fits one (integers are passed as `ffi.cast("void *", n)`). preadv/pwritev and readv/writev
take an iovec array built as bytes: a virtqueue chain's buffers (pyvmm/devices/virtio/rings/
chain.py), moved in one system call; struct flock is what fcntl(2) locks a disk image with.
openat2(2) has no libc wrapper: it goes through syscall(2), declared with the fixed arguments
openat2 takes (on arm64 and x86-64 Linux a variadic call passes them in the same registers),
and prctl(2) likewise with its four further arguments (a daemon's parent-death signal).
"""

CDEF = """
int ioctl(int fd, unsigned long request, void *arg);
ssize_t preadv(int fd, const void *iov, int iovcnt, int64_t offset);   /* iov: struct iovec[] */
ssize_t pwritev(int fd, const void *iov, int iovcnt, int64_t offset);
ssize_t readv(int fd, const void *iov, int iovcnt);
ssize_t writev(int fd, const void *iov, int iovcnt);

/* fcntl(2) record locks (F_OFD_SETLK), for disk images: <asm-generic/fcntl.h> on LP64 */
struct flock {
    short l_type;
    short l_whence;
    int64_t l_start;
    int64_t l_len;
    int l_pid;
};

/* openat2(2), for the 9p server's confined lookups: <linux/openat2.h> */
struct open_how {
    uint64_t flags;
    uint64_t mode;
    uint64_t resolve;
};
long syscall(long number, int dirfd, const char *path, struct open_how *how, size_t size);
int prctl(int option, unsigned long arg2, unsigned long arg3, unsigned long arg4, unsigned long arg5);
"""

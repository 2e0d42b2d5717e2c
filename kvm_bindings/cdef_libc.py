"""libc functions called through cffi.

ioctl is declared with a pointer third argument rather than as variadic: calling a variadic
function in ABI mode is not portable, and every KVM ioctl takes either a pointer or an integer
that fits one (integers are passed as `ffi.cast("void *", n)`).
"""

CDEF = """
int ioctl(int fd, unsigned long request, void *arg);
"""

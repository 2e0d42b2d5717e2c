"""KVM ioctl request numbers, computed like the kernel's _IO/_IOR/_IOW/_IOWR macros.

Sizes come from the cffi declarations, so a layout mistake shows up as a wrong ioctl number in
the golden tests. Numbers and directions are those of include/uapi/linux/kvm.h (and if_tun.h,
vhost.h).
"""

from __future__ import annotations

from collections.abc import Callable

from ioctl_opt import IOC as _IOC
from ioctl_opt import IOC_NONE, IOC_READ, IOC_WRITE

from kvm_bindings import ffi

IOC: Callable[[int, int, int, int], int] = _IOC  # (dir, type, nr, size); ioctl_opt has no type hints
KVMIO = 0xAE


def _io(nr: int) -> int:
    return IOC(IOC_NONE, KVMIO, nr, 0)


def _iow(nr: int, ctype: str) -> int:
    return IOC(IOC_WRITE, KVMIO, nr, ffi.sizeof(ctype))


def _ior(nr: int, ctype: str) -> int:
    return IOC(IOC_READ, KVMIO, nr, ffi.sizeof(ctype))


def _iowr(nr: int, ctype: str) -> int:
    return IOC(IOC_READ | IOC_WRITE, KVMIO, nr, ffi.sizeof(ctype))


# /dev/kvm
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
# VM fd
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, "struct kvm_userspace_memory_region")
KVM_IRQ_LINE = _iow(0x61, "struct kvm_irq_level")
KVM_IRQFD = _iow(0x76, "struct kvm_irqfd")
KVM_IOEVENTFD = _iow(0x79, "struct kvm_ioeventfd")
KVM_ENABLE_CAP = _iow(0xA3, "struct kvm_enable_cap")
KVM_ARM_PREFERRED_TARGET = _ior(0xAF, "struct kvm_vcpu_init")
KVM_CREATE_DEVICE = _iowr(0xE0, "struct kvm_create_device")
# device, VM and vCPU fds (device attributes)
KVM_SET_DEVICE_ATTR = _iow(0xE1, "struct kvm_device_attr")
KVM_GET_DEVICE_ATTR = _iow(0xE2, "struct kvm_device_attr")
KVM_HAS_DEVICE_ATTR = _iow(0xE3, "struct kvm_device_attr")
# vCPU fd
KVM_RUN = _io(0x80)
KVM_SET_MP_STATE = _iow(0x99, "struct kvm_mp_state")
KVM_SET_GUEST_DEBUG = _iow(0x9B, "struct kvm_guest_debug")
KVM_GET_ONE_REG = _iow(0xAB, "struct kvm_one_reg")
KVM_SET_ONE_REG = _iow(0xAC, "struct kvm_one_reg")
KVM_ARM_VCPU_INIT = _iow(0xAE, "struct kvm_vcpu_init")
KVM_GET_REG_LIST = _iowr(0xB0, "struct kvm_reg_list")
KVM_ARM_VCPU_FINALIZE = _iow(0xC2, "int")  # its argument: the feature to finalize (KVM_ARM_VCPU_SVE)

# tap devices, /dev/net/tun (include/uapi/linux/if_tun.h: declared with int, they take struct
# ifreq * and int * respectively)
TUNSETIFF = IOC(IOC_WRITE, ord("T"), 202, ffi.sizeof("int"))
TUNSETVNETHDRSZ = IOC(IOC_WRITE, ord("T"), 216, ffi.sizeof("int"))

# the kernel's vhost devices (include/uapi/linux/vhost.h)
VHOST_VIRTIO = 0xAF
VHOST_GET_FEATURES = IOC(IOC_READ, VHOST_VIRTIO, 0x00, ffi.sizeof("uint64_t"))
VHOST_SET_FEATURES = IOC(IOC_WRITE, VHOST_VIRTIO, 0x00, ffi.sizeof("uint64_t"))
VHOST_SET_OWNER = IOC(IOC_NONE, VHOST_VIRTIO, 0x01, 0)
VHOST_SET_MEM_TABLE = IOC(IOC_WRITE, VHOST_VIRTIO, 0x03, ffi.sizeof("struct vhost_memory"))
VHOST_SET_VRING_NUM = IOC(IOC_WRITE, VHOST_VIRTIO, 0x10, ffi.sizeof("struct vhost_vring_state"))
VHOST_SET_VRING_ADDR = IOC(IOC_WRITE, VHOST_VIRTIO, 0x11, ffi.sizeof("struct vhost_vring_addr"))
VHOST_SET_VRING_BASE = IOC(IOC_WRITE, VHOST_VIRTIO, 0x12, ffi.sizeof("struct vhost_vring_state"))
VHOST_GET_VRING_BASE = IOC(IOC_READ | IOC_WRITE, VHOST_VIRTIO, 0x12, ffi.sizeof("struct vhost_vring_state"))
VHOST_SET_VRING_KICK = IOC(IOC_WRITE, VHOST_VIRTIO, 0x20, ffi.sizeof("struct vhost_vring_file"))
VHOST_SET_VRING_CALL = IOC(IOC_WRITE, VHOST_VIRTIO, 0x21, ffi.sizeof("struct vhost_vring_file"))
VHOST_NET_SET_BACKEND = IOC(IOC_WRITE, VHOST_VIRTIO, 0x30, ffi.sizeof("struct vhost_vring_file"))
VHOST_VSOCK_SET_GUEST_CID = IOC(IOC_WRITE, VHOST_VIRTIO, 0x60, ffi.sizeof("uint64_t"))
VHOST_VSOCK_SET_RUNNING = IOC(IOC_WRITE, VHOST_VIRTIO, 0x61, ffi.sizeof("int"))

# name of every request, for error messages
NAMES: dict[int, str] = {v: k for k, v in list(globals().items())
                         if k.startswith(("KVM_", "TUN", "VHOST_")) and k not in ("KVMIO", "VHOST_VIRTIO")}

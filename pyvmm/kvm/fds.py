"""The only module that issues ioctls: thin wrappers over /dev/kvm, VM, vCPU and device fds,
over /dev/net/tun for virtio-net's tap backend, and over the kernel's vhost devices.

One method per ioctl, no policy (the shape of rust-vmm's kvm-ioctls). All calls go through cffi's
libc `ioctl`, which releases the GIL, and KVM_RUN's EINTR is returned to the caller rather than
retried (CPython's fcntl.ioctl retries EINTR from 3.14 on, which would defeat a kick).
Failures raise KvmIoctlError naming the ioctl and errno.
"""

from __future__ import annotations

import errno
import functools
import mmap
import os
from collections.abc import Callable

from kvm_bindings import ffi, libc
from kvm_bindings import ioctls as io
from kvm_bindings.constants import (
    IFF_NO_PI,
    IFF_TAP,
    IFF_VNET_HDR,
    KVM_API_VERSION,
    KVM_ARM_VM_SMCCC_CTRL,
    KVM_ARM_VM_SMCCC_FILTER,
    KVM_CREATE_DEVICE_TEST,
    Cap,
)
from kvm_bindings.regs import CORE_REGS
from pyvmm.errors import KvmIoctlError, KvmUnavailableError

_NULL = ffi.NULL
_KVM_RUN = io.KVM_RUN
_GET_ONE_REG = io.KVM_GET_ONE_REG
_SET_ONE_REG = io.KVM_SET_ONE_REG


def _ioctl(fd: int, request: int, arg: object = _NULL, context: str = "") -> int:
    """ioctl with a pointer (cdata) or integer argument; retries EINTR, raises on failure."""
    if isinstance(arg, int):
        arg = ffi.cast("void *", arg)
    while True:
        ret: int = libc.ioctl(fd, request, arg)
        if ret >= 0:
            return ret
        err = ffi.errno
        if err != errno.EINTR:
            raise KvmIoctlError(io.NAMES.get(request, hex(request)), err, context)


class Kvm:
    """/dev/kvm."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailableError(
                f"{path} does not exist: this host has no KVM (arm64 Linux with KVM enabled is needed)"
            ) from None
        except PermissionError:
            raise KvmUnavailableError(f"no permission to open {path} (add yourself to group kvm)") from None
        except OSError as e:
            raise KvmUnavailableError(f"cannot open {path}: {e.strerror}") from None
        version = _ioctl(self.fd, io.KVM_GET_API_VERSION, 0)
        if version != KVM_API_VERSION:
            raise KvmUnavailableError(f"KVM API version {version} is not the stable version 12")

    def check_extension(self, cap: Cap | int) -> int:
        return _ioctl(self.fd, io.KVM_CHECK_EXTENSION, int(cap))

    def vcpu_mmap_size(self) -> int:
        return _ioctl(self.fd, io.KVM_GET_VCPU_MMAP_SIZE, 0)

    def create_vm(self, ipa_bits: int = 0) -> VmFd:
        # machine type: the IPA size in bits 7:0 (0 = the default 40 bits), api.rst KVM_CREATE_VM
        return VmFd(_ioctl(self.fd, io.KVM_CREATE_VM, ipa_bits), self)

    def close(self) -> None:
        os.close(self.fd)


class DeviceAttrs:
    """KVM_{HAS,GET,SET}_DEVICE_ATTR, shared by VM, vCPU and device fds."""

    fd: int

    def has_device_attr(self, group: int, attr: int) -> bool:
        a = ffi.new("struct kvm_device_attr *", {"group": group, "attr": attr})
        return bool(libc.ioctl(self.fd, io.KVM_HAS_DEVICE_ATTR, a) == 0)

    def set_device_attr(self, group: int, attr: int, addr: int = 0, context: str = "") -> None:
        a = ffi.new("struct kvm_device_attr *", {"group": group, "attr": attr, "addr": addr})
        _ioctl(self.fd, io.KVM_SET_DEVICE_ATTR, a, context)

    def set_device_attr_u64(self, group: int, attr: int, value: int, context: str = "") -> None:
        val = ffi.new("uint64_t *", value)
        self.set_device_attr(group, attr, int(ffi.cast("uintptr_t", val)), context)

    def set_device_attr_u32(self, group: int, attr: int, value: int, context: str = "") -> None:
        val = ffi.new("uint32_t *", value)
        self.set_device_attr(group, attr, int(ffi.cast("uintptr_t", val)), context)

    def get_device_attr_u32(self, group: int, attr: int, context: str = "") -> int:
        return self._get_device_attr("uint32_t *", group, attr, context)

    def get_device_attr_u64(self, group: int, attr: int, context: str = "") -> int:
        return self._get_device_attr("uint64_t *", group, attr, context)

    def _get_device_attr(self, ctype: str, group: int, attr: int, context: str) -> int:
        val = ffi.new(ctype)
        a = ffi.new("struct kvm_device_attr *", {"group": group, "attr": attr, "addr": int(ffi.cast("uintptr_t", val))})
        _ioctl(self.fd, io.KVM_GET_DEVICE_ATTR, a, context)
        return int(val[0])


class DeviceFd(DeviceAttrs):
    """An in-kernel device made by KVM_CREATE_DEVICE (e.g. the vGIC)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close(self) -> None:
        os.close(self.fd)


class VmFd(DeviceAttrs):
    def __init__(self, fd: int, kvm: Kvm) -> None:
        self.fd = fd
        self.kvm = kvm

    def check_extension(self, cap: Cap | int) -> int:
        return _ioctl(self.fd, io.KVM_CHECK_EXTENSION, int(cap))

    def enable_cap(self, cap: Cap | int, *args: int) -> None:
        c = ffi.new("struct kvm_enable_cap *", {"cap": int(cap), "args": list(args)})
        _ioctl(self.fd, io.KVM_ENABLE_CAP, c, f"cap {int(cap)}")

    def set_user_memory_region(self, slot: int, gpa: int, size: int, host_addr: int, flags: int = 0) -> None:
        r = ffi.new("struct kvm_userspace_memory_region *", {
            "slot": slot, "flags": flags, "guest_phys_addr": gpa, "memory_size": size,
            "userspace_addr": host_addr})
        _ioctl(self.fd, io.KVM_SET_USER_MEMORY_REGION, r, f"slot {slot} at {gpa:#x}+{size:#x}")

    def set_smccc_filter(self, base: int, nr_functions: int, action: int) -> None:
        """KVM_ARM_VM_SMCCC_FILTER (Documentation/virt/kvm/devices/vm.rst)."""
        f = ffi.new("struct kvm_smccc_filter *",
                    {"base": base, "nr_functions": nr_functions, "action": action})
        self.set_device_attr(KVM_ARM_VM_SMCCC_CTRL, KVM_ARM_VM_SMCCC_FILTER,
                             int(ffi.cast("uintptr_t", f)))

    def preferred_target(self) -> tuple[int, list[int]]:
        init = ffi.new("struct kvm_vcpu_init *")
        _ioctl(self.fd, io.KVM_ARM_PREFERRED_TARGET, init)
        return init.target, list(init.features)

    def create_vcpu(self, index: int) -> VcpuFd:
        size = self.kvm.vcpu_mmap_size()
        return VcpuFd(_ioctl(self.fd, io.KVM_CREATE_VCPU, index, f"vcpu {index}"), size)

    def create_device(self, dev_type: int) -> DeviceFd:
        d = ffi.new("struct kvm_create_device *", {"type": dev_type, "flags": 0})
        _ioctl(self.fd, io.KVM_CREATE_DEVICE, d, f"device type {dev_type}")
        return DeviceFd(d.fd)

    def can_create_device(self, dev_type: int) -> bool:
        """KVM_CREATE_DEVICE with KVM_CREATE_DEVICE_TEST: whether KVM could make one (none is made)."""
        d = ffi.new("struct kvm_create_device *", {"type": dev_type, "flags": KVM_CREATE_DEVICE_TEST})
        return bool(libc.ioctl(self.fd, io.KVM_CREATE_DEVICE, d) == 0)

    def irq_line(self, irq: int, level: int) -> None:
        _ioctl(self.fd, io.KVM_IRQ_LINE, ffi.new("struct kvm_irq_level *", {"irq": irq, "level": level}))

    def ioeventfd(self, addr: int, length: int, fd: int, flags: int = 0, datamatch: int = 0) -> None:
        e = ffi.new("struct kvm_ioeventfd *",
                    {"addr": addr, "len": length, "fd": fd, "flags": flags, "datamatch": datamatch})
        _ioctl(self.fd, io.KVM_IOEVENTFD, e, f"at {addr:#x}")

    def irqfd(self, fd: int, gsi: int, flags: int = 0, resamplefd: int = 0) -> None:
        i = ffi.new("struct kvm_irqfd *", {"fd": fd, "gsi": gsi, "flags": flags, "resamplefd": resamplefd})
        _ioctl(self.fd, io.KVM_IRQFD, i, f"gsi {gsi}")

    def close(self) -> None:
        os.close(self.fd)


class VcpuFd(DeviceAttrs):
    """A vCPU fd with its mmap'ed struct kvm_run.

    Register access is on the exit path, so each register ID gets a preallocated kvm_one_reg
    sharing one u64 buffer: a write is one store and one ioctl. vCPU ioctls other than KVM_RUN
    take vcpu->mutex killably and never return EINTR, so they need no retry loop.
    """

    def __init__(self, fd: int, mmap_size: int) -> None:
        self.fd = fd
        try:
            self.mmap = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            os.close(fd)
            raise KvmIoctlError("mmap of kvm_run", e.errno or 0) from None
        self.run_struct = ffi.from_buffer("struct kvm_run *", self.mmap)
        self._val = ffi.new("uint64_t *")
        self._val_addr = int(ffi.cast("uintptr_t", self._val))
        self._regs: dict[int, object] = {}
        self._x_regs = tuple(self._new_reg(CORE_REGS[f"x{n}"]) for n in range(31))  # for get_x

        # The exit path's two ioctls, prepared as C-level callables (no Python frame per call;
        # under emulation each Python-level step costs microseconds). Both return the raw ioctl
        # result: the exit loop asks failed() what a -1 was; set_x0() raises itself.
        #   run():       KVM_RUN
        #   write_x0():  KVM_SET_ONE_REG(x0) from the buffer x0_value, the one register every
        #                forwarded SMCCC call writes (the exit loop with a call's single result,
        #                set_x0, and the benchmarks' floors)
        self.run: Callable[[], int] = functools.partial(libc.ioctl, fd, _KVM_RUN, _NULL)
        # x0's kvm_one_reg and the value it points at share one allocation, so (almost always)
        # one page: under emulation every page touched after a world switch costs a soft-TLB refill.
        # x0_value is a one-word memoryview of that value: storing through it costs less than
        # through a cffi pointer, and every forwarded call stores one result there.
        reg_words = ffi.sizeof("struct kvm_one_reg") // ffi.sizeof("uint64_t")
        x0_block = self._x0_block = ffi.new("uint64_t[]", reg_words + 1)
        value = x0_block + reg_words
        self.x0_value = memoryview(ffi.buffer(value, 8)).cast("Q")
        self._x0_reg = ffi.cast("struct kvm_one_reg *", x0_block)
        self._x0_reg.id = CORE_REGS["x0"]
        self._x0_reg.addr = int(ffi.cast("uintptr_t", value))
        self.write_x0: Callable[[], int] = functools.partial(libc.ioctl, fd, _SET_ONE_REG, self._x0_reg)
        # kvm_run as 32- and 64-bit words, for the exit loop's reads (pyvmm/kvm/exits.py has the
        # indices): indexing a memoryview is the cheapest read Python has of the mapping
        self.run_words = memoryview(self.mmap).cast("I")
        self.run_quads = memoryview(self.mmap).cast("Q")

    def set_x0(self, value: int) -> None:
        """x0 <- value (a 64-bit pattern) through the prepared KVM_SET_ONE_REG: one ioctl and no
        allocation (the exit loop makes the same two steps inline)."""
        self.x0_value[0] = value
        if self.write_x0() < 0:
            raise KvmIoctlError("KVM_SET_ONE_REG", ffi.errno)

    def failed(self, name: str) -> bool:
        """After a prepared ioctl returned -1: True for a kick (EINTR/EAGAIN), else raise."""
        err = ffi.errno
        if err in (errno.EINTR, errno.EAGAIN) and name == "KVM_RUN":
            return True
        raise KvmIoctlError(name, err)

    def _new_reg(self, reg_id: int) -> object:
        reg = self._regs[reg_id] = ffi.new("struct kvm_one_reg *", {"id": reg_id, "addr": self._val_addr})
        return reg

    def get_one_reg(self, reg_id: int) -> int:
        if libc.ioctl(self.fd, _GET_ONE_REG, self._regs.get(reg_id) or self._new_reg(reg_id)) < 0:
            raise KvmIoctlError("KVM_GET_ONE_REG", ffi.errno, f"reg {reg_id:#x}")
        value: int = self._val[0]
        return value

    def get_x(self, n: int) -> int:
        """x<n> (0-30): get_one_reg without looking the register up, for a call's arguments."""
        if libc.ioctl(self.fd, _GET_ONE_REG, self._x_regs[n]) < 0:
            raise KvmIoctlError("KVM_GET_ONE_REG", ffi.errno, f"x{n}")
        value: int = self._val[0]
        return value

    def set_one_reg(self, reg_id: int, value: int) -> None:
        self._val[0] = value & 0xFFFF_FFFF_FFFF_FFFF
        if libc.ioctl(self.fd, _SET_ONE_REG, self._regs.get(reg_id) or self._new_reg(reg_id)) < 0:
            raise KvmIoctlError("KVM_SET_ONE_REG", ffi.errno, f"reg {reg_id:#x}")

    def get_one_reg_bytes(self, reg_id: int, size: int) -> bytes:
        """A register wider or narrower than 64 bits (V0-V31: 16 bytes; FPSR, FPCR: 4), as its
        little-endian bytes; the size is in the ID's KVM_REG_SIZE field and must match."""
        buf = ffi.new("uint8_t[]", size)
        reg = ffi.new("struct kvm_one_reg *", {"id": reg_id, "addr": int(ffi.cast("uintptr_t", buf))})
        _ioctl(self.fd, _GET_ONE_REG, reg, f"reg {reg_id:#x}")
        return bytes(ffi.buffer(buf))

    def set_one_reg_bytes(self, reg_id: int, data: bytes) -> None:
        buf = ffi.new("uint8_t[]", data)
        reg = ffi.new("struct kvm_one_reg *", {"id": reg_id, "addr": int(ffi.cast("uintptr_t", buf))})
        _ioctl(self.fd, _SET_ONE_REG, reg, f"reg {reg_id:#x}")

    def set_guest_debug(self, control: int, bcr: list[int], bvr: list[int], wcr: list[int], wvr: list[int]) -> None:
        """KVM_SET_GUEST_DEBUG (api.rst 4.56): `control` is KVM_GUESTDBG_* bits; with
        KVM_GUESTDBG_USE_HW the breakpoint and watchpoint register values (arm64's
        kvm_guest_debug_arch: DBGBCR/DBGBVR/DBGWCR/DBGWVR, 16 each, unused ones 0)."""
        dbg = ffi.new("struct kvm_guest_debug *", {"control": control})
        mask = 0xFFFF_FFFF_FFFF_FFFF
        for i, (c, v) in enumerate(zip(bcr, bvr, strict=True)):
            dbg.arch.dbg_bcr[i], dbg.arch.dbg_bvr[i] = c & mask, v & mask
        for i, (c, v) in enumerate(zip(wcr, wvr, strict=True)):
            dbg.arch.dbg_wcr[i], dbg.arch.dbg_wvr[i] = c & mask, v & mask
        _ioctl(self.fd, io.KVM_SET_GUEST_DEBUG, dbg)

    def vcpu_init(self, target: int, features: list[int]) -> None:
        init = ffi.new("struct kvm_vcpu_init *", {"target": target, "features": features})
        _ioctl(self.fd, io.KVM_ARM_VCPU_INIT, init)

    def finalize(self, feature: int) -> None:
        """KVM_ARM_VCPU_FINALIZE: fix a feature's configuration (SVE's vector lengths), once."""
        _ioctl(self.fd, io.KVM_ARM_VCPU_FINALIZE, ffi.new("int *", feature), f"feature {feature}")

    def set_mp_state(self, state: int) -> None:
        _ioctl(self.fd, io.KVM_SET_MP_STATE, ffi.new("struct kvm_mp_state *", {"mp_state": state}))

    def get_reg_list(self) -> list[int]:
        probe = ffi.new("struct kvm_reg_list *")
        if libc.ioctl(self.fd, io.KVM_GET_REG_LIST, probe) == 0 or ffi.errno != errno.E2BIG:
            raise KvmIoctlError("KVM_GET_REG_LIST", ffi.errno)
        lst = ffi.new("struct kvm_reg_list *", [probe.n, probe.n])  # n, then the array's length
        _ioctl(self.fd, io.KVM_GET_REG_LIST, lst)
        return list(lst.reg[0:lst.n])

    def close(self) -> None:
        self.run_words.release()
        self.run_quads.release()
        ffi.release(self.run_struct)
        self.mmap.close()
        os.close(self.fd)


def open_tap(name: str, vnet_hdr_size: int) -> int:
    """Attach to (or create) tap device `name` (Documentation/networking/tuntap.rst): frames
    without packet information, each preceded by a virtio-net header of `vnet_hdr_size` bytes.
    Returns a non-blocking fd."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        req = ffi.new("struct ifreq *")
        req.ifr_name = name.encode()
        req.ifr_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
        _ioctl(fd, io.TUNSETIFF, req, name)
        _ioctl(fd, io.TUNSETVNETHDRSZ, ffi.new("int *", vnet_hdr_size), name)
    except BaseException:
        os.close(fd)
        raise
    return fd


class VhostFd:
    """A kernel vhost device (/dev/vhost-net, /dev/vhost-vsock; drivers/vhost/vhost.c), owned by
    this process: its worker thread reaches guest RAM through this process's mappings."""

    def __init__(self, path: str) -> None:
        """Raises OSError if `path` cannot be opened (no module loaded, no permission)."""
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            _ioctl(self.fd, io.VHOST_SET_OWNER, 0, path)
        except BaseException:
            os.close(self.fd)
            raise

    def get_features(self) -> int:
        out = ffi.new("uint64_t *")
        _ioctl(self.fd, io.VHOST_GET_FEATURES, out)
        return int(out[0])

    def set_features(self, features: int) -> None:
        _ioctl(self.fd, io.VHOST_SET_FEATURES, ffi.new("uint64_t *", features))

    def set_mem_table(self, regions: list[tuple[int, int, int]]) -> None:
        """(guest-physical address, size, address in this process) of each region."""
        table = ffi.new("struct vhost_memory *", {"nregions": len(regions), "regions": len(regions)})
        for i, (gpa, size, host_addr) in enumerate(regions):
            table.regions[i] = {"guest_phys_addr": gpa, "memory_size": size, "userspace_addr": host_addr}
        _ioctl(self.fd, io.VHOST_SET_MEM_TABLE, table)

    def set_vring_num(self, index: int, num: int) -> None:
        _ioctl(self.fd, io.VHOST_SET_VRING_NUM, ffi.new("struct vhost_vring_state *", (index, num)))

    def set_vring_base(self, index: int, base: int) -> None:
        _ioctl(self.fd, io.VHOST_SET_VRING_BASE, ffi.new("struct vhost_vring_state *", (index, base)))

    def get_vring_base(self, index: int) -> int:
        """Stops the ring; returns the next available index it would have read."""
        state = ffi.new("struct vhost_vring_state *", (index, 0))
        _ioctl(self.fd, io.VHOST_GET_VRING_BASE, state)
        return int(state.num)

    def set_vring_addr(self, index: int, desc: int, used: int, avail: int) -> None:
        """Addresses in this process of the ring's three parts."""
        addr = ffi.new("struct vhost_vring_addr *", {"index": index, "desc_user_addr": desc,
                                                     "used_user_addr": used, "avail_user_addr": avail})
        _ioctl(self.fd, io.VHOST_SET_VRING_ADDR, addr)

    def set_vring_kick(self, index: int, fd: int) -> None:
        _ioctl(self.fd, io.VHOST_SET_VRING_KICK, ffi.new("struct vhost_vring_file *", (index, fd)))

    def set_vring_call(self, index: int, fd: int) -> None:
        _ioctl(self.fd, io.VHOST_SET_VRING_CALL, ffi.new("struct vhost_vring_file *", (index, fd)))

    def net_set_backend(self, index: int, fd: int) -> None:
        """/dev/vhost-net: ring `index` moves frames to and from tap `fd` (-1: stop)."""
        _ioctl(self.fd, io.VHOST_NET_SET_BACKEND, ffi.new("struct vhost_vring_file *", (index, fd)))

    def vsock_set_guest_cid(self, cid: int) -> None:
        """/dev/vhost-vsock: this device is the guest with context ID `cid`; EADDRINUSE while
        another holds it (drivers/vhost/vsock.c vhost_vsock_set_cid)."""
        _ioctl(self.fd, io.VHOST_VSOCK_SET_GUEST_CID, ffi.new("uint64_t *", cid))

    def vsock_set_running(self, running: bool) -> None:
        """/dev/vhost-vsock: start or stop serving the rings (all of them at once)."""
        _ioctl(self.fd, io.VHOST_VSOCK_SET_RUNNING, ffi.new("int *", int(running)))

    def close(self) -> None:
        """Closing stops every ring and lets go of the memory table (vhost_net_release)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

"""C declarations from include/uapi/linux/kvm.h (Linux 6.12), the subset pyvmm uses on arm64.

Field names and order follow the header exactly; golden tests (tests/unit/test_layouts.py) pin
every size and key offset to the values the header produces.
"""

CDEF = """
struct kvm_userspace_memory_region {
    uint32_t slot;
    uint32_t flags;
    uint64_t guest_phys_addr;
    uint64_t memory_size;
    uint64_t userspace_addr;
};

struct kvm_irq_level {
    union {
        uint32_t irq;
        int32_t status;
    };
    uint32_t level;
};

struct kvm_mp_state {
    uint32_t mp_state;
};

struct kvm_ioeventfd {
    uint64_t datamatch;
    uint64_t addr;
    uint32_t len;
    int32_t fd;
    uint32_t flags;
    uint8_t pad[36];
};

struct kvm_irqfd {
    uint32_t fd;
    uint32_t gsi;
    uint32_t flags;
    uint32_t resamplefd;
    uint8_t pad[16];
};

struct kvm_enable_cap {
    uint32_t cap;
    uint32_t flags;
    uint64_t args[4];
    uint8_t pad[64];
};

struct kvm_one_reg {
    uint64_t id;
    uint64_t addr;
};

struct kvm_reg_list {
    uint64_t n;
    uint64_t reg[];
};

struct kvm_create_device {
    uint32_t type;
    uint32_t fd;
    uint32_t flags;
};

struct kvm_device_attr {
    uint32_t flags;
    uint32_t group;
    uint64_t attr;
    uint64_t addr;
};

struct kvm_signal_mask {
    uint32_t len;
    uint8_t sigset[];
};

/* for KVM_RUN, returned by mmap(vcpu_fd, offset=0) */
struct kvm_guest_debug {
    uint32_t control;           /* KVM_GUESTDBG_* */
    uint32_t pad;
    struct kvm_guest_debug_arch arch;
};

struct kvm_run {
    /* in */
    uint8_t request_interrupt_window;
    uint8_t immediate_exit;     /* immediate_exit__unsafe since 6.10; same byte */
    uint8_t padding1[6];
    /* out */
    uint32_t exit_reason;
    uint8_t ready_for_interrupt_injection;
    uint8_t if_flag;
    uint16_t flags;
    /* in (pre_kvm_run), out (post_kvm_run) */
    uint64_t cr8;
    uint64_t apic_base;
    union {
        struct {                /* KVM_EXIT_UNKNOWN */
            uint64_t hardware_exit_reason;
        } hw;
        struct {                /* KVM_EXIT_FAIL_ENTRY */
            uint64_t hardware_entry_failure_reason;
            uint32_t cpu;
        } fail_entry;
        struct {                /* KVM_EXIT_MMIO */
            uint64_t phys_addr;
            uint8_t data[8];
            uint32_t len;
            uint8_t is_write;
        } mmio;
        struct {                /* KVM_EXIT_HYPERCALL */
            uint64_t nr;
            uint64_t args[6];
            uint64_t ret;
            union {
                uint32_t longmode;
                uint64_t flags;
            };
        } hypercall;
        struct {                /* KVM_EXIT_INTERNAL_ERROR */
            uint32_t suberror;
            uint32_t ndata;
            uint64_t data[16];
        } internal;
        struct {                /* KVM_EXIT_SYSTEM_EVENT */
            uint32_t type;
            uint32_t ndata;
            union {
                uint64_t flags;
                uint64_t data[16];
            };
        } system_event;
        struct {                /* KVM_EXIT_DEBUG */
            struct kvm_debug_exit_arch arch;
        } debug;
        struct {                /* KVM_EXIT_ARM_NISV */
            uint64_t esr_iss;
            uint64_t fault_ipa;
        } arm_nisv;
        char padding[256];
    };
    uint64_t kvm_valid_regs;
    uint64_t kvm_dirty_regs;
    union {
        char padding[2048];     /* SYNC_REGS_SIZE_BYTES */
    } s;
};
"""

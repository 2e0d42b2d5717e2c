"""C declarations from arch/arm64/include/uapi/asm/kvm.h and asm/ptrace.h (Linux 6.12)."""

CDEF = """
struct user_pt_regs {
    uint64_t regs[31];
    uint64_t sp;
    uint64_t pc;
    uint64_t pstate;
};

/* user_fpsimd_state holds __uint128_t vregs[32], which is 16-byte aligned; cffi has no 128-bit
 * type, so each vreg is two u64 and the alignment hole before fp_regs is spelled out. */
struct user_fpsimd_state {
    uint64_t vregs[64];
    uint32_t fpsr;
    uint32_t fpcr;
    uint32_t __reserved[2];
};

struct kvm_regs {
    struct user_pt_regs regs;   /* sp = sp_el0 */
    uint64_t sp_el1;
    uint64_t elr_el1;
    uint64_t spsr[5];           /* KVM_NR_SPSR */
    uint64_t __fp_regs_align;   /* hole: fp_regs is 16-byte aligned */
    struct user_fpsimd_state fp_regs;
};

struct kvm_vcpu_init {
    uint32_t target;
    uint32_t features[7];
};

struct kvm_vcpu_events {
    struct {
        uint8_t serror_pending;
        uint8_t serror_has_esr;
        uint8_t ext_dabt_pending;
        uint8_t pad[5];
        uint64_t serror_esr;
    } exception;
    uint32_t reserved[12];
};

/* Guest debug (Documentation/virt/kvm/api.rst, KVM_SET_GUEST_DEBUG and KVM_EXIT_DEBUG): the
 * hardware breakpoint and watchpoint registers KVM loads while debugging, KVM_ARM_MAX_DBG_REGS
 * of each; the exit's ESR_EL2 (hsr, hsr_high = ESR[61:32]) and FAR (a watchpoint's address). */
struct kvm_guest_debug_arch {
    uint64_t dbg_bcr[16];
    uint64_t dbg_bvr[16];
    uint64_t dbg_wcr[16];
    uint64_t dbg_wvr[16];
};

struct kvm_debug_exit_arch {
    uint32_t hsr;
    uint32_t hsr_high;
    uint64_t far;
};

struct kvm_smccc_filter {
    uint32_t base;
    uint32_t nr_functions;
    uint8_t action;
    uint8_t pad[15];
};
"""

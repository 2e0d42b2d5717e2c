"""PSCI 1.1 (Arm DEN0022E), serviced in Python from KVM_EXIT_HYPERCALL.

Both PSCI ranges (0x84000000 and 0xC4000000, 0x20 IDs each) are forwarded, so every PSCI call,
implemented or not, is answered here and never by KVM's in-kernel PSCI. Topology: one power
level (cores); a core's affinity is its MPIDR_EL1 Aff3..Aff0 as KVM assigns it.

Implemented: PSCI_VERSION, CPU_SUSPEND, CPU_OFF, CPU_ON, AFFINITY_INFO, MIGRATE_INFO_TYPE,
SYSTEM_OFF, SYSTEM_RESET, PSCI_FEATURES, SYSTEM_SUSPEND, SYSTEM_RESET2 (the mandatory set of §5.1
plus the two optional system calls). There is no Trusted OS (MIGRATE_INFO_TYPE answers 2), so
MIGRATE and MIGRATE_INFO_UP_CPU are not implemented (§5.1: optional then), like CPU_FREEZE,
CPU_DEFAULT_SUSPEND, NODE_HW_STATE, SET_SUSPEND_MODE and PSCI_STAT_*: they answer NOT_SUPPORTED,
and PSCI_FEATURES, which may only report what is implemented (§5.15), says so.
"""

from __future__ import annotations

from devicetree.builder import Node
from pyvmm.machine.power import Entry, Power
from pyvmm.smccc.call import SmcccCall
from pyvmm.smccc.context import ServiceContext, ServiceVcpu
from pyvmm.smccc.function_id import SMC64, Owner
from pyvmm.smccc.service import NO_RESULT, Results, Service, function

PSCI_VERSION_1_1 = (1 << 16) | 1
SMCCC_VERSION = 0x8000_0000

# Return codes (§5.2.2)
SUCCESS = 0
NOT_SUPPORTED = -1
INVALID_PARAMETERS = -2
DENIED = -3
ALREADY_ON = -4
ON_PENDING = -5
INTERNAL_FAILURE = -6
NOT_PRESENT = -7
DISABLED = -8
INVALID_ADDRESS = -9
ERROR_NAMES = {0: "SUCCESS", -1: "NOT_SUPPORTED", -2: "INVALID_PARAMETERS", -3: "DENIED", -4: "ALREADY_ON",
               -5: "ON_PENDING", -6: "INTERNAL_FAILURE", -7: "NOT_PRESENT", -8: "DISABLED",
               -9: "INVALID_ADDRESS"}

# MPIDR affinity fields: Aff3 [39:32], Aff2..Aff0 [23:0]; SMC32 calls carry only Aff2..Aff0 (§5.1.4)
AFFINITY_MASK_64 = 0xFF_00FF_FFFF
AFFINITY_MASK_32 = 0x00FF_FFFF

# CPU_SUSPEND power_state, original format (§5.4.2): StateID [15:0], StateType [16], PowerLevel [25:24]
POWER_STATE_TYPE_POWERDOWN = 1 << 16
POWER_STATE_LEVEL_SHIFT = 24
POWER_STATE_RESERVED = ~(0xFFFF | (1 << 16) | (3 << 24)) & 0xFFFF_FFFF

MIGRATE_INFO_TYPE_NOT_PRESENT = 2  # no Trusted OS that needs migrating (§5.9)
SYSTEM_WARM_RESET = 0  # the one architectural SYSTEM_RESET2 reset type (§5.17)

F32, F64 = 0x8400_0000, 0xC400_0000


def _both(number: int) -> tuple[int, int]:
    return F32 + number, F64 + number


class Psci(Service):
    name = "PSCI"
    owner = Owner.STANDARD_SECURE
    ranges = ((F32, 0x20), (F64, 0x20))
    revision = (1, 1)
    error_names = ERROR_NAMES

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        # the vCPU each target_cpu/target_affinity names, by affinity mask (MPIDRs never change)
        self._by_affinity = {mask: {v.mpidr & mask: v for v in ctx.vcpus}
                             for mask in (AFFINITY_MASK_64, AFFINITY_MASK_32)}

    def describe_affinity(self, x0: int) -> str:
        return Power(x0).name if x0 in Power._value2member_map_ else self.describe_result(x0)

    def dt_node(self) -> tuple[str, Node]:
        return psci_node(self.ctx.conduit)

    # --- helpers -----------------------------------------------------------------------------
    def _target(self, call: SmcccCall, affinity: int) -> ServiceVcpu | None:
        """The vCPU a target_cpu/target_affinity argument names."""
        return self._by_affinity[AFFINITY_MASK_64 if call.function_id & SMC64 else AFFINITY_MASK_32].get(affinity)

    def _in_ram(self, address: int) -> bool:
        return self.ctx.memory.contains(address, 4)

    # --- functions ---------------------------------------------------------------------------
    @function(F32 + 0x0, name="PSCI_VERSION", describe="describe_value")
    def version(self, call: SmcccCall) -> Results:
        return PSCI_VERSION_1_1

    @function(*_both(0x1), name="CPU_SUSPEND", args=("power_state", "entry_point_address", "context_id"))
    def cpu_suspend(self, call: SmcccCall) -> Results:
        power_state, entry, context_id = call.args(3)
        if power_state & POWER_STATE_RESERVED or power_state >> POWER_STATE_LEVEL_SHIFT & 3:
            return INVALID_PARAMETERS  # reserved bits, or a power level above the core
        if power_state & POWER_STATE_TYPE_POWERDOWN:
            if not self._in_ram(entry):
                return INVALID_ADDRESS
            call.vcpu.suspend(Entry(entry, context_id))  # wakes at entry, x0 = context ID
        else:
            call.vcpu.suspend(None)  # standby: returns SUCCESS once woken
        return SUCCESS

    @function(F32 + 0x2, name="CPU_OFF")
    def cpu_off(self, call: SmcccCall) -> Results:
        call.vcpu.power_off()
        return NO_RESULT  # on success CPU_OFF does not return (§5.5)

    @function(*_both(0x3), name="CPU_ON", args=("target_cpu", "entry_point_address", "context_id"))
    def cpu_on(self, call: SmcccCall) -> Results:
        target_cpu, entry, context_id = call.args(3)
        target = self._target(call, target_cpu)
        if target is None:
            return INVALID_PARAMETERS
        if not self._in_ram(entry):
            return INVALID_ADDRESS
        refused = target.request_on(Entry(entry, context_id))  # atomic: one succeeds, the rest see ON
        if refused is None:
            return SUCCESS
        return ALREADY_ON if refused == Power.ON else ON_PENDING

    @function(*_both(0x4), name="AFFINITY_INFO", args=("target_affinity", "lowest_affinity_level"),
              describe="describe_affinity")
    def affinity_info(self, call: SmcccCall) -> Results:
        affinity, level = call.args(2)
        if level != 0:  # one power level: only cores can be asked about
            return INVALID_PARAMETERS
        target = self._target(call, affinity)
        if target is None:
            return INVALID_PARAMETERS
        return int(target.guest_power)  # a plain int: the dispatcher's single-result fast path

    @function(F32 + 0x6, name="MIGRATE_INFO_TYPE", describe="describe_value")
    def migrate_info_type(self, call: SmcccCall) -> Results:
        return MIGRATE_INFO_TYPE_NOT_PRESENT

    @function(F32 + 0x8, name="SYSTEM_OFF")
    def system_off(self, call: SmcccCall) -> Results:
        self.ctx.system.power_off_system(call.vcpu, "PSCI SYSTEM_OFF")
        return NO_RESULT

    @function(F32 + 0x9, name="SYSTEM_RESET")
    def system_reset(self, call: SmcccCall) -> Results:
        self.ctx.system.request_reset(call.vcpu, "PSCI SYSTEM_RESET")
        return NO_RESULT

    @function(F32 + 0xA, name="PSCI_FEATURES", args=("psci_func_id",))
    def features(self, call: SmcccCall) -> Results:
        fid = call.arg(1)
        if fid == SMCCC_VERSION:
            return SUCCESS  # SMCCC_VERSION is implemented (by KVM); Linux relies on this (§5.15)
        if self.lookup(fid) is None:  # not a PSCI function pyvmm implements
            return NOT_SUPPORTED
        # CPU_SUSPEND: bit 1 = 0, original power_state format; bit 0 = 0, no OS-initiated mode
        return SUCCESS

    @function(*_both(0xE), name="SYSTEM_SUSPEND", args=("entry_point_address", "context_id"))
    def system_suspend(self, call: SmcccCall) -> Results:
        entry, context_id = call.args(2)
        if any(v.power != Power.OFF for v in self.ctx.vcpus if v is not call.vcpu):
            return DENIED  # every other core must be off (§5.20)
        if not self._in_ram(entry):
            return INVALID_ADDRESS
        call.vcpu.suspend(Entry(entry, context_id))
        return SUCCESS

    @function(*_both(0x12), name="SYSTEM_RESET2", args=("reset_type", "cookie"))
    def system_reset2(self, call: SmcccCall) -> Results:
        reset_type = call.arg(1)
        if reset_type != SYSTEM_WARM_RESET:
            return INVALID_PARAMETERS  # no vendor-specific reset types
        self.ctx.system.request_reset(call.vcpu, "PSCI SYSTEM_RESET2 (warm reset)")
        return NO_RESULT


class KvmPsci(Service):
    """KVM's own PSCI, when pyvmm does not serve PSCI (Vm(psci=False)): no function is forwarded,
    but the guest still finds PSCI, and so its CPUs' enable-method, through the device tree.
    Since Linux 6.4 KVM answers HVC and SMC #0 alike (arch/arm64/kvm/hypercalls.c); before, it
    answers every SMC NOT_SUPPORTED (handle_smc), so the VM refuses the SMC conduit there."""

    name = "KVM PSCI"

    def __init__(self, conduit: str) -> None:
        self.conduit = conduit

    def dt_node(self) -> tuple[str, Node]:
        return psci_node(self.conduit)


def psci_node(conduit: str) -> tuple[str, Node]:
    """/psci (Documentation/devicetree/bindings/arm/psci.yaml): PSCI 1.0+ firmware is compatible
    with 0.2, and only the conduit is needed (the function IDs are the standard ones)."""
    return "/", Node("psci", {"compatible": ["arm,psci-1.0", "arm,psci-0.2"], "method": conduit})

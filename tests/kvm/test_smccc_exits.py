"""Forwarded SMCCC calls on real KVM: conduit, four results, preserved registers, the filter."""

from __future__ import annotations

import pytest

from kvm_bindings.constants import SmcccFilterAction
from pyvmm.errors import SmcccFilterError
from pyvmm.smccc import filter as smccc_filter
from pyvmm.smccc.call import SmcccCall
from pyvmm.smccc.filter import FilterRange
from pyvmm.smccc.service import Results
from pyvmm.testing.payloads import MakePayloadVm
from tests.kvm.conftest import SIP32, SIP64, guest, needs_filter

pytestmark = needs_filter("it tests forwarded SMCCC calls")

U64 = 0xFFFF_FFFF_FFFF_FFFF


@pytest.mark.parametrize("conduit", ["hvc", "smc"])
@pytest.mark.parametrize("trace", [False, True], ids=["fast", "traced"])  # the dispatcher's two paths
def test_forwarded_calls_return_four_values_on_the_vms_conduit(payload_vm: MakePayloadVm, conduit: str,
                                                               trace: bool) -> None:
    run = payload_vm(guest("smccc_roundtrip"), conduit=conduit, trace=trace)
    seen: list[tuple[int, str, tuple[int, ...]]] = []

    def sip64(call: SmcccCall) -> Results:
        seen.append((call.function_id, call.conduit, call.args(3)))
        x1, x2, x3 = call.args(3)
        return (0xFEED_FACE_CAFE_BEEF, x1 + 1, x2 + 2, x3 + 3)

    def sip32(call: SmcccCall) -> Results:
        seen.append((call.function_id, call.conduit, call.args(1)))
        return (0x9ABC_DEF0, -1)  # w0, w1: an SMC32 call's results are 32 bits (wider is an error)

    # up to the report call (FN_REPORT, FN_REPORT32: SiP function 0xF0), which the plugin answers
    run.vm.smccc.register(SIP64, 0xF0, sip64, "test SiP64")
    run.vm.smccc.register(SIP32, 0xF0, sip32, "test SiP32")
    result = run.run(30).result
    assert result.reason == "poweroff", result

    # only the VM's conduit reaches the service; SMC32 arguments are seen as 32 bits (w1)
    assert seen == [(SIP64 + 1, conduit, (0x1111, 0x2222, 0x3333)), (SIP32 + 1, conduit, (0xFFFF_FFFF,))]
    served = (0xFEED_FACE_CAFE_BEEF, 0x1112, 0x2224, 0x3336, 0)  # x0..x3 seen, x4..x17 clobber mask
    refused = (U64, 0x1111, 0x2222, 0x3333, 0)  # NOT_SUPPORTED; x1..x3 untouched
    hvc_report, smc_report = run.values[0][:5], run.values[1][:5]
    assert (hvc_report, smc_report) == ((served, refused) if conduit == "hvc" else (refused, served))
    assert run.values[2][:2] == (0x9ABC_DEF0, 0xFFFF_FFFF)  # -1 in w1 is 0xffffffff


def test_filter_on_reserved_range_is_refused_clearly(payload_vm: MakePayloadVm) -> None:
    vm = payload_vm(guest("spin")).vm
    vm.smccc.register(0x8000_0000, 0x10, lambda call: 0, "arch")
    with pytest.raises(SmcccFilterError, match=r"0x80000000-0x8000000f.*reserves"):
        vm.run(timeout=5)


def test_kernel_refuses_reserved_range_and_error_names_it(payload_vm: MakePayloadVm) -> None:
    vm = payload_vm(guest("spin")).vm
    bad = FilterRange(0xC000_0000, 4, SmcccFilterAction.FWD_TO_USER, "arch64")
    with pytest.raises(SmcccFilterError, match=r"0xc0000000-0xc0000003 fwd_to_user \(arch64\).*EEXIST"):
        smccc_filter.install_range(vm.fd, bad)


def test_filter_after_a_vcpu_ran_fails_clearly(payload_vm: MakePayloadVm) -> None:
    vm = payload_vm(guest("spin")).vm
    assert vm.run(timeout=0.5).reason == "timeout"
    late = FilterRange(SIP64, 0x10, SmcccFilterAction.FWD_TO_USER, "late")
    with pytest.raises(SmcccFilterError, match=r"vCPU has already run.*EBUSY"):
        smccc_filter.install_range(vm.fd, late)


def test_deny_range_is_answered_by_kvm(payload_vm: MakePayloadVm) -> None:
    """A denied range never exits to userspace: the guest gets NOT_SUPPORTED from KVM itself."""
    run = payload_vm(guest("hvc_loop"), trace=False)
    vm = run.vm
    vm.smccc.deny(SIP64, 0x10, "denied")
    vm.vcpus[0].set_x(9, 3)  # calls to make
    vm.vcpus[0].set_x(10, SIP64 + 1)  # function to call
    assert run.run(30).reason == "poweroff"
    ticks, freq, calls, last_x0 = run.values[0][:4]
    assert calls == 3
    assert last_x0 == U64  # NOT_SUPPORTED (-1) from KVM
    assert vm.smccc.calls == 2  # only the report and SYSTEM_OFF exited to userspace


def test_owner_4_call_count_counts_kvms_trng_too(payload_vm: MakePayloadVm) -> None:
    """Call Count for owner 4 from a guest: PSCI's 16 function IDs, and the 5 of the TRNG that
    this KVM answers itself (it offers TRNG: its KVM_REG_ARM_STD_BMAP says so)."""
    run = payload_vm(guest("hvc_loop"), trace=False)
    vm = run.vm
    assert vm.vcpus[0].kvm_offers_trng()
    vm.vcpus[0].set_x(9, 1)
    vm.vcpus[0].set_x(10, 0x8400_FF00)  # Standard Secure Service Call Count
    assert run.run(30).reason == "poweroff"
    assert run.values[0][2:4] == (1, 16 + 5)


def test_unrouted_id_in_forwarded_range_gets_not_supported(payload_vm: MakePayloadVm) -> None:
    run = payload_vm(guest("hvc_loop"), trace=False)
    vm = run.vm
    vm.smccc.register(SIP64, 0x10, lambda call: -1 if call.function_id != SIP64 else 0, "partial")
    vm.vcpus[0].set_x(9, 2)
    vm.vcpus[0].set_x(10, SIP64 + 5)
    assert run.run(30).reason == "poweroff"
    assert run.values[0][2:4] == (2, U64)
    assert vm.smccc.calls == 4  # two calls, the report, SYSTEM_OFF


@pytest.mark.parametrize("trace", [False, True], ids=["fast", "traced"])
def test_handler_exception_ends_the_run_with_its_message(payload_vm: MakePayloadVm, trace: bool) -> None:
    vm = payload_vm(guest("hvc_loop"), trace=trace).vm

    def broken(call: SmcccCall) -> Results:
        raise RuntimeError("bug in the service")

    vm.smccc.register(SIP64, 0x10, broken, "broken")
    vm.vcpus[0].set_x(9, 1)
    vm.vcpus[0].set_x(10, SIP64 + 1)
    result = vm.run(timeout=30)
    assert result.reason == "error"
    assert "0xc2000001 raised RuntimeError: bug in the service" in result.message

"""AArch32 guests (KVM_ARM_VCPU_EL1_32BIT, kvmtool's --aarch32): their SMC32 calls are serviced,
every SMC64/HVC64 call gets NOT_SUPPORTED (SMCCC 1.3 §5.2), and CPU_ON honours a T32 entry point."""

from __future__ import annotations

import pytest

from pyvmm.errors import VmmError
from pyvmm.smccc.call import SmcccCall
from pyvmm.testing.payloads import MakePayloadVm, Payloads
from tests.conftest import errors
from tests.kvm.conftest import SIP32, SIP64, guest, needs_filter
from tests.kvm.test_cli_and_examples import run_cli

pytestmark = needs_filter("it tests pyvmm's SMCCC services for AArch32 callers")

NOT_SUPPORTED32 = 0xFFFF_FFFF
SVC, AIF = 0x13, 0x7 << 6


@pytest.mark.parametrize("conduit", ["hvc", "smc"])
def test_aarch32_callers_get_smc32_service_and_no_smc64(payload_vm: MakePayloadVm, conduit: str) -> None:
    run = payload_vm(guest("a32/smccc32"), cpus=2, conduit=conduit, aarch32=True)
    vm = run.vm
    vm.smccc.register(SIP32 + 1, 1, lambda call: 100 + call.arg(1), "sip32")
    sip64_calls: list[SmcccCall] = []

    def sip64(call: SmcccCall) -> int:
        sip64_calls.append(call)
        return 42

    vm.smccc.register(SIP64 + 1, 1, sip64, "sip64")
    result = run.run(120).result
    assert (result.reason, result.message) == ("poweroff", "PSCI SYSTEM_OFF"), result

    (psci_version, smccc_version, sip, *_), = run.tagged(1)
    assert (psci_version, sip) == (0x1_0001, 107)
    assert smccc_version >= 0x1_0001  # KVM's own answer: SMC32 arch calls stay with KVM
    assert run.tagged(2) == [(NOT_SUPPORTED32,) * 4 + (0,)]  # CPU_ON64, SDEI, SiP64, TRNG_RND64
    assert sip64_calls == []  # the rule comes before any handler
    assert run.tagged(3)[0][0] == 0  # CPU_ON32 at a T32 entry: SUCCESS
    (context, cpsr, *_), = run.tagged(4)  # cpu1 ran the T32 code at its entry
    assert context == 0x5A
    assert (cpsr & 0x1F, cpsr & AIF) == (SVC, AIF)


def test_aarch32_vm_refuses_sdei(payload_vm: MakePayloadVm) -> None:
    vm = payload_vm(guest("a32/smccc32"), aarch32=True).vm
    with pytest.raises(VmmError, match="SMC64"):
        vm.enable_sdei()


def test_cli_aarch32_kernel_traces_the_rule(pyvmm_payloads: Payloads) -> None:
    """`--aarch32 -k` boots a flat AArch32 binary at RAM + 0x8000 as kvmtool does, and the trace
    says why each SMC64 call got NOT_SUPPORTED."""
    kernel = pyvmm_payloads.build(guest("a32/smccc32"), arch="aarch32")
    p = run_cli("run", "--aarch32", "-c", "2", "-k", str(kernel), "--trace", "smccc",
                "--timeout", "60")
    assert p.returncode == 0, p.stderr
    assert "not a zImage: loaded as a flat AArch32 binary at RAM + 0x8000" in p.stderr
    refused = [line for line in p.stderr.splitlines() if "an SMC64 call from AArch32" in line]
    assert len(refused) == 4, p.stderr
    p = run_cli("run", "--aarch32", "--sdei", "-k", str(pyvmm_payloads.build(guest("a32/smccc32"), arch="aarch32")))
    assert p.returncode != 0 and len(errors(p.stderr)) == 1 and "SDEI" in p.stderr, p.stderr

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import pytest

from pyvmm.machine.cpu_features import AS_THE_HOST_OFFERS, CpuOptions
from pyvmm.machine.vm import Vm
from pyvmm.smccc.call import SmcccCall
from tests.conftest import guest_image

SIP64 = 0xC200_0000
SIP32 = 0x8200_0000
FN_REPORT = 0xC200_00F0
FN_REPORT32 = 0x8200_00F0  # AArch32 guests' report call (tests/guests/a32/common32.inc)


HERE = Path(__file__).resolve().parent


def needs_filter(what: str) -> pytest.MarkDecorator:
    """The mark of a test that does not apply to a host without the SMCCC filter (Linux < 6.4)."""
    return pytest.mark.host(smccc_filter=True, reason=f"{what}, which needs the SMCCC filter of Linux >= 6.4")


# the commonest reason: pyvmm's test guests report their values with an SMC64 call to a forwarded
# SiP function (FN_REPORT), and many tests answer calls with a handler of their own
NEEDS_FILTER = needs_filter("its guest reports, or it answers calls, through forwarded SMCCC calls")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/kvm/ is KVM tier (the hook sees the whole session's items)."""
    for item in items:
        if HERE in Path(item.fspath).resolve().parents:
            item.add_marker(pytest.mark.kvm)


class MakeVm(Protocol):
    def __call__(self, guest: str, *, cpus: int = 1, mem_mib: int = 16, conduit: str = "hvc",
                 unhandled_mmio: str = "ignore", aarch32: bool = False, cpu: CpuOptions = AS_THE_HOST_OFFERS,
                 irqchip: str = "auto") -> Vm: ...


@pytest.fixture
def make_vm() -> Iterator[MakeVm]:
    """Build a Vm with a guest payload loaded at the start of RAM; closed after the test."""
    vms: list[Vm] = []

    def make(guest: str, *, cpus: int = 1, mem_mib: int = 16, conduit: str = "hvc",
             unhandled_mmio: str = "ignore", aarch32: bool = False, cpu: CpuOptions = AS_THE_HOST_OFFERS,
             irqchip: str = "auto") -> Vm:
        vm = Vm(cpus=cpus, mem_mib=mem_mib, conduit=conduit, unhandled_mmio=unhandled_mmio, aarch32=aarch32,
                cpu=cpu, irqchip=irqchip)
        vms.append(vm)
        entry = vm.load_file(guest_image(guest))
        vm.set_boot(entry)
        return vm

    yield make
    for vm in vms:
        vm.close()


def guest_for(name: str, conduit: str) -> str:
    """The build of guest `name` whose firmware calls use `conduit`."""
    return name if conduit == "hvc" else f"{name}_smc"


def s64(value: int) -> int:
    """A 64-bit register value as a signed number (PSCI error codes)."""
    return value - (1 << 64) if value >> 63 else value


def s32(value: int) -> int:
    return value - (1 << 32) if value >> 31 else value


class Reports:
    """Collects FN_REPORT calls (x1..x6) from a test guest."""

    def __init__(self) -> None:
        self.values: list[tuple[int, ...]] = []

    def __call__(self, call: SmcccCall) -> int:
        self.values.append(call.args(6))
        return 0

    def tagged(self, tag: int) -> list[tuple[int, ...]]:
        """Reports whose x1 is `tag`, as (x2, .., x6)."""
        return [v[1:] for v in self.values if v[0] == tag]

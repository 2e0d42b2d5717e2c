"""An SMCCC service with a device-tree node of its own, as a contributor adds one: its class (a
module under pyvmm/services/, or a file given to --service) and the one line that adds it to a
VM. The guest finds the node where the service said (README, "Where things live")."""

from __future__ import annotations

import io

from pyfdt.pyfdt import FdtBlobParse

from devicetree.builder import Node, build_dtb
from pyvmm.machine.vm import Vm
from pyvmm.smccc.call import SmcccCall
from pyvmm.smccc.function_id import Owner
from pyvmm.smccc.service import Results, Service, function
from tests.kvm.conftest import needs_filter

FN_TEMPERATURE = 0xC200_0010  # a SiP SMC64 fast call (SMCCC 1.4 table 6-2, owner 2)


class Thermal(Service):
    name = "thermal"
    owner = Owner.SIP
    ranges = ((FN_TEMPERATURE, 1),)

    @function(FN_TEMPERATURE, name="TEMPERATURE")
    def temperature(self, call: SmcccCall) -> Results:
        return 42

    def dt_node(self) -> tuple[str, Node]:
        return "/firmware", Node("thermal", {"compatible": "example,smccc-thermal", "method": "hvc"})


def dts(vm: Vm) -> str:
    """The VM's device tree as the guest gets it, read back by pyfdt (the emulated host has no dtc)."""
    text: str = FdtBlobParse(io.BytesIO(build_dtb(vm.device_tree()))).to_fdt().to_dts()
    return text


@needs_filter("a service of pyvmm's is served through the SMCCC filter")
def test_a_service_brings_its_own_node() -> None:
    with Vm() as vm:
        assert "example,smccc-thermal" not in dts(vm)
        vm.smccc.add_service(Thermal())  # the line
        tree = dts(vm)
    firmware = tree[tree.index("firmware {"):]
    assert "thermal {" in firmware and 'compatible = "example,smccc-thermal";' in firmware, tree

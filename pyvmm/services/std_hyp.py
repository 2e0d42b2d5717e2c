"""The Standard Hypervisor Service owner (SMCCC 1.4 owner 5).

pyvmm implements no standard hypervisor calls itself (KVM keeps PV time in the kernel), but it
answers the owner's General Service Queries, so a guest can identify the hypervisor's
implementation of this owner: Call Count 0, Call UID pyvmm's UID, Revision 1.0.
"""

from __future__ import annotations

from pyvmm.smccc.function_id import Owner
from pyvmm.smccc.service import Service


class StandardHypervisor(Service):
    name = "Standard Hypervisor Service"
    owner = Owner.STANDARD_HYP
    ranges = ()

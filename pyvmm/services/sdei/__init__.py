"""SDEI 1.1 (Arm DEN0054B, Software Delegated Exception Interface), serviced in Python.

The client (the guest OS at EL1) registers handlers for events; pyvmm delivers an event by
taking the target vCPU out of KVM_RUN and rewriting its registers so that it runs the handler,
even if the guest had every interrupt masked.

Events:
  * event 0: private, normal priority, signalled by a client with EVENT_SIGNAL (§5.1.16);
  * platform events a user declares (`EventSpec`): private or shared, normal or critical, raised
    by the host with `Sdei.trigger()` (Python) or `pyvmm sdei signal` (the control socket);
  * bound events (INTERRUPT_BIND, §5.1.14): an SPI a pyvmm device drives becomes shared event
    BIND_EVENT_BASE + slot; while that event is registered the line is taken from the vGIC and
    its level raises the event instead (FEATURES(BIND_SLOTS) tells the client how many slots).
    Lines KVM raises from an irqfd (virtio devices) never pass through pyvmm and cannot be bound.

Dispatch (§6.3, §6.5): on the target vCPU's own thread, with its state consistent (after an
immediate-exit KVM_RUN, Documentation/virt/kvm/api.rst), x0-x17, PC and PSTATE are saved and
the handler is entered at EL1h with DAIF masked, x0 = event, x1 = registered argument, x2 =
interrupted PC, x3 = interrupted PSTATE. EVENT_CONTEXT reads the saved x0-x17; EVENT_COMPLETE
restores them with PC and PSTATE; EVENT_COMPLETE_AND_RESUME restores x0-x17 and enters the resume
address as if an IRQ had been taken there: ELR_EL1/SPSR_EL1 = interrupted PC/PSTATE. A critical
event preempts a running normal handler; a masked PE, a running handler of equal or higher
priority, and a vCPU that is off or in power-down suspend all defer delivery (the event stays
pending). A PE in standby (PSCI CPU_SUSPEND) is woken by an event.

The package: events.py (event kinds, numbers, the §6.1 state machine), delivery.py (entering and
leaving a handler in the guest's registers), service.py (the 19 calls and the host side).
"""

from pyvmm.services.sdei.delivery import Frame, Pe, exception_pstate
from pyvmm.services.sdei.events import EventSpec, Registration, parse_event
from pyvmm.services.sdei.service import Sdei

__all__ = ["EventSpec", "Frame", "Pe", "Registration", "Sdei", "exception_pstate", "parse_event"]

from pyvmm.smccc.trace import TracePrinter
from pyvmm.vm import Vm

vm = Vm(cpus=2, mem_mib=16)
vm.set_boot(vm.load_file("build/guests/psci_suspend.bin"))
vm.smccc.register(0xC20000F0, 1, lambda c: 0, "report")
vm.smccc.trace = TracePrinter()
print(vm.run(timeout=8))
for v in vm.vcpus:
    print(v.index, v.power, v.fd.get_mp_state(), hex(v.get_reg("pc")), hex(v.get_sysreg(3,3,14,3,1)))

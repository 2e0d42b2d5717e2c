"""The KVM plumbing: the /dev/kvm, VM, vCPU and device file descriptors and every ioctl on them
(fds.py), and the decoding of a vCPU's exits from its kvm_run (exits.py). Nothing above this
layer issues an ioctl or reads kvm_run's layout."""

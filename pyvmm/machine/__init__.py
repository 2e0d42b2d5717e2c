"""The machine: a VM (vm.py) and its life cycle, vCPUs and their power states, the exits they
bring to userspace and where each goes (exit_dispatch.py), guest memory and the images loaded
into it, the interrupt lines and the GIC, the CPU the guest sees, and what this host can do."""

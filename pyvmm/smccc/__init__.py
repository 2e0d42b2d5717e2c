"""SMC Calling Convention: function IDs, the KVM filter, calls and their dispatch."""

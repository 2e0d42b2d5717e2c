"""pyvmm benchmarks (`make bench`): every figure is measured in one run, against its baseline."""

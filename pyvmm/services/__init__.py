"""SMCCC services pyvmm implements: one module per service."""

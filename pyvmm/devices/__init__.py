"""Device models and the MMIO bus they sit on."""

"""GPU kernels (Triton). Importing this package needs `triton`; nothing in the core imports it."""

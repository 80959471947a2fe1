"""refmoe: a readable reference engine for hybrid CPU-GPU Mixture-of-Experts inference."""

__version__ = "0.1.0"

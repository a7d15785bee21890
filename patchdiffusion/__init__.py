"""patchdiffusion: patch-based diffusion models for images (train, sample, evaluate)."""

__version__ = "0.1.0"

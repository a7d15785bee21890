"""What a method needs to run its diffusion in a VAE's latent space (Patch Diffusion, DiMR).

A method mixing this in has `latent`, `vae_path`, `latent_cache` and `net.in_channels` in its config.
The VAE is a diffusers AutoencoderKL from a local directory (`patchdiffusion/latent.py`); it is not
part of the trained network or its checkpoints, so it is loaded on first use.
"""

from __future__ import annotations

import torch


class LatentSpaceMixin:
    @property
    def downsample(self) -> int:
        """Image side / the side diffusion runs at (the VAE factor, or 1 in pixel space)."""
        if not self.config.latent:
            return 1
        from patchdiffusion.latent import vae_info

        return vae_info(self.config.vae_path).downsample

    def check_tiled_canvas(self, height: int, width: int) -> None:
        from patchdiffusion.errors import ConfigError

        f = self.downsample
        if height % f or width % f:
            raise ConfigError(f"canvas {width}x{height} is not divisible by the VAE's factor {f}; "
                              f"use e.g. {max(f, round(width / f) * f)}x{max(f, round(height / f) * f)}")

    def canvas_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.downsample
        return (self.config.net.in_channels, height // f, width // f)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.latent:
            x = self.codec(x.device).decode(x)
        return x.clamp(-1, 1)

    def codec(self, device: torch.device):
        """The VAE, loaded on first use and moved to `device` when asked for elsewhere."""
        if getattr(self, "_codec", None) is None:
            from patchdiffusion.latent import LatentCodec

            self._codec = LatentCodec(self.config.vae_path, device, cache_dir=self.config.latent_cache or None)
        elif self._codec.device != torch.device(device):
            self._codec.to(device)
        return self._codec

"""Latent space: a diffusers `AutoencoderKL` loaded from a local directory (no downloads).

Images in [-1, 1] are encoded to `scaling_factor · z` (the factor read from the VAE's config,
0.18215 for Stable Diffusion's VAEs), and latents are divided by it before decoding, as Patch
Diffusion's reference code does. `z` is a draw from the encoder's Gaussian (`latent_dist.sample()`
in diffusers), here with noise passed in by the caller so that each example uses its own seed.

With a cache directory, the encoder's Gaussian (mean and std) of each distinct image is stored on
disk the first time the image is seen, under the SHA-1 of its pixels, so every later step (and a
later run on the same data) skips the encoder and only draws the noise; the result is the same as
encoding again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from patchdiffusion.config import ConfigError


@dataclass(frozen=True)
class VAEInfo:
    """What the rest of the code needs to know about a VAE, read from its config.json alone."""

    latent_channels: int
    downsample: int  # image side / latent side
    scaling_factor: float


def vae_info(path: str | Path) -> VAEInfo:
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"'{path}' is not a VAE directory (no config.json; save one with save_pretrained)")
    cfg = json.loads(config_path.read_text())
    return VAEInfo(
        latent_channels=int(cfg.get("latent_channels", 4)),
        downsample=2 ** (len(cfg.get("block_out_channels", [64])) - 1),
        scaling_factor=float(cfg.get("scaling_factor", 0.18215)),
    )


def _image_key(image: torch.Tensor) -> str:
    return hashlib.sha1(image.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()


class LatentCodec:
    """Encode images to scaled latents and decode them back, with an optional on-disk cache."""

    def __init__(self, path: str | Path, device: torch.device | str = "cpu", cache_dir: str | Path | None = None):
        try:
            from diffusers import AutoencoderKL
        except ImportError:
            raise ConfigError("latent space needs diffusers: pip install 'patchdiffusion[latent]'") from None
        self.info = vae_info(path)
        self.vae = AutoencoderKL.from_pretrained(str(path)).to(device).eval().requires_grad_(False)
        self.device = torch.device(device)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.cache_hits = 0

    @property
    def scaling_factor(self) -> float:
        return self.info.scaling_factor

    def to(self, device: torch.device | str) -> "LatentCodec":
        self.device = torch.device(device)
        self.vae.to(self.device)
        return self

    @torch.no_grad()
    def moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the encoder's Gaussian for images (B, 3, H, W) in [-1, 1]; each (B, 4, H/f, W/f)."""
        if self.cache_dir is None:
            return self._encode(images)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        from safetensors.torch import load_file, save_file

        keys = [_image_key(im) for im in images]
        paths = [self.cache_dir / f"{k}.safetensors" for k in keys]
        missing = [i for i, p in enumerate(paths) if not p.is_file()]
        self.cache_hits += len(images) - len(missing)
        if missing:
            mean, std = self._encode(images[missing])
            for n, i in enumerate(missing):
                tmp = paths[i].with_suffix(".tmp")
                save_file({"mean": mean[n].cpu().contiguous(), "std": std[n].cpu().contiguous()}, str(tmp))
                tmp.replace(paths[i])
        loaded = [load_file(str(p)) for p in paths]
        mean = torch.stack([d["mean"] for d in loaded]).to(images.device)
        std = torch.stack([d["std"] for d in loaded]).to(images.device)
        return mean, std

    def _encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.vae.encode(images.to(self.device, torch.float32)).latent_dist
        return dist.mean.to(images.device), dist.std.to(images.device)

    def encode(self, images: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """scaling_factor · (mean + std · noise); noise None gives the mean (deterministic)."""
        mean, std = self.moments(images)
        z = mean if noise is None else mean + std * noise.to(mean)
        return z * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W), roughly in [-1, 1], from scaled latents."""
        out = self.vae.decode((latents / self.scaling_factor).to(self.device, torch.float32)).sample
        return out.to(latents.device)

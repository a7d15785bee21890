"""The baseline: one network call on the whole image, EDM framework (Karras et al. 2022).

With `net.patch_size` > 1 the U-Net patchifies its input (Luhman & Luhman's reshape) but the
diffusion stays EDM's; `--method patching` is Luhman & Luhman's whole recipe.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from patchdiffusion.config import Range
from patchdiffusion.diffusion.losses import EDMLoss
from patchdiffusion.diffusion.precond import EDMPrecond
from patchdiffusion.diffusion.schedules import edm_sigmas
from patchdiffusion.errors import ConfigError
from patchdiffusion.methods.base import Method, TrainBatch
from patchdiffusion.nets.unet import UNet, UNetConfig
from patchdiffusion.rng import SampleRNG


def _default_net() -> UNetConfig:
    return UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(8,))


def comparison_unet(side: int) -> list[str]:
    """The baseline network of `patchdiff compare` (the default U-Net: 1.19M parameters, 250M multiply-adds
    per 32² image), self-attention on the 8×8 level of a 32² image (side / 4), as the default does."""
    return ["model.net.model_channels=32", "model.net.channel_mult=[1,2,2]", "model.net.num_res_blocks=1",
            f"model.net.attention_resolutions=[{max(1, side // 4)}]"]


@dataclass
class EDMSettings:
    """EDM's noise-level settings, shared by the methods built on the EDM framework."""

    sigma_data: float = 0.5              # EDM σ_data: expected std of the data
    P_mean: float = -1.2                 # training noise levels: ln σ ~ N(P_mean, P_std²)
    P_std: float = 1.2
    sigma_min: float = 0.002             # sampling noise range and EDM's ρ
    sigma_max: float = 80.0
    rho: float = 7.0
    label_dropout: float = 0.0           # share of labels replaced by the null label (for guidance)

    RANGES: ClassVar[dict] = {
        "sigma_data": Range(0, 1e3, low_open=True), "P_mean": Range(-20, 20), "P_std": Range(0, 20, low_open=True),
        "sigma_min": Range(0, 1e4, low_open=True), "sigma_max": Range(0, 1e6, low_open=True),
        "rho": Range(0, 1e3, low_open=True), "label_dropout": Range(0, 1),
    }


def edm_sampling_sigmas(settings: EDMSettings, steps: int) -> torch.Tensor:
    """EDM eq. 5 noise levels for `steps` steps from the settings' σ range and ρ."""
    return edm_sigmas(steps, sigma_min=settings.sigma_min, sigma_max=settings.sigma_max, rho=settings.rho)


@dataclass
class FullConfig(EDMSettings):
    net: UNetConfig = field(default_factory=_default_net)  # the backbone


def check_divisible(net: UNetConfig, height: int, width: int) -> None:
    """The U-Net needs sides divisible by patch_size · 2^(levels − 1)."""
    divisor = net.patch_size * 2 ** (len(net.channel_mult) - 1)
    if height % divisor or width % divisor:
        raise ConfigError(
            f"image size {width}x{height} is not divisible by {divisor} "
            f"(patch_size {net.patch_size} × 2^{len(net.channel_mult) - 1} downsamplings)"
        )


class FullImageMethod(Method):
    name = "full"
    Config = FullConfig
    default_sampler = "heun"
    default_steps = 18

    @classmethod
    def comparison_overrides(cls, resolution: tuple[int, int]) -> list[str]:
        # The yardstick the other methods' comparison networks are sized against; EDM's Heun, 18 steps.
        return comparison_unet(min(resolution)) + ["sample.sampler=heun", "sample.num_steps=18"]

    def validate(self) -> None:
        if self.config.net.in_channels != self.image_channels:
            raise ConfigError(
                f"model.net.in_channels is {self.config.net.in_channels} but the data has {self.image_channels} channels"
            )
        check_divisible(self.config.net, *self.resolution)

    @property
    def num_classes(self) -> int:
        return self.config.net.num_classes

    def build_network(self) -> UNet:
        # The nominal resolution (which picks the attention levels) is the training resolution.
        return UNet(dataclasses.replace(self.config.net, resolution=min(self.resolution)))

    def loss(self, net, batch: TrainBatch, rng: SampleRNG) -> torch.Tensor:
        cfg = self.config
        edm_loss = EDMLoss(P_mean=cfg.P_mean, P_std=cfg.P_std, sigma_data=cfg.sigma_data)
        cond = {}
        labels = self.drop_labels(batch.labels, rng, cfg.label_dropout)
        if labels is not None:
            cond["class_labels"] = labels
        per_element = edm_loss(EDMPrecond(net, sigma_data=cfg.sigma_data), batch.images, rng, **cond)
        return per_element.flatten(1).mean(1)

    def denoiser(self, net, options=None):
        return EDMPrecond(net, sigma_data=self.config.sigma_data)

    def sampling_sigmas(self, steps: int) -> torch.Tensor:
        return edm_sampling_sigmas(self.config, steps)

    def check_canvas(self, height: int, width: int) -> None:
        check_divisible(self.config.net, height, width)


METHOD = FullImageMethod

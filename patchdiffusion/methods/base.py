"""The Method interface.

A method answers one question: what does the network see, and how are its outputs put back
together? It owns
  * how a batch of training images becomes network inputs, conditioning and a loss (`loss`), and
  * how the trained network becomes a denoiser over a whole canvas (`denoiser`), which any sampler
    in `diffusion/samplers.py` can then drive (`sample`).
Methods hold no weights; the network they build is trained by the one loop in `train.py`.
"""

from __future__ import annotations

import abc
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from patchdiffusion.config import ConfigError
from patchdiffusion.diffusion.samplers import get_sampler
from patchdiffusion.diffusion.schedules import schedule_from_name
from patchdiffusion.rng import SampleRNG

Denoiser = Callable[..., Any]


def discrete_schedule(config: Any):
    """The VPSchedule a discrete-time method's config names (`schedule`, `timesteps`); ConfigError if unknown."""
    try:
        return schedule_from_name(config.schedule, config.timesteps)
    except ValueError as e:
        raise ConfigError(f"model.schedule: {e}") from None


def clipped(denoiser: Denoiser) -> Denoiser:
    """Clamp the x0 estimate (and pass a variance output through) — applied after guidance, as ADM does."""

    def clipped_denoiser(x, sigma, **cond):
        out = denoiser(x, sigma, **cond)
        if isinstance(out, tuple):
            return (out[0].clamp(-1, 1), *out[1:])
        return out.clamp(-1, 1)

    return clipped_denoiser


@dataclass(frozen=True)
class StepPlan:
    """What one training step looks like, drawn once for the whole global batch (all processes alike)."""

    multiplier: int = 1  # the step loads batch_size × multiplier examples (e.g. more, smaller patches)
    options: dict = field(default_factory=dict)  # keyword arguments for `loss` (e.g. the patch size)


class Method(abc.ABC):
    name: ClassVar[str]
    Config: ClassVar[type]
    default_sampler: ClassVar[str] = "heun"
    default_steps: ClassVar[int] = 18
    clip_denoised: ClassVar[bool] = False  # clamp x0_hat to [-1, 1] after guidance (DDPM's clip_denoised)
    needs_image_index: ClassVar[bool] = False  # the loss takes image_index= (each example's data set index)

    def __init__(self, config: Any, resolution: tuple[int, int], image_channels: int = 3):
        self.config = config
        self.resolution = tuple(resolution)  # (height, width) of training images
        self.image_channels = image_channels
        self.validate()

    # -- to be provided by each method -------------------------------------------------------
    def validate(self) -> None:
        """Raise ConfigError (one clear sentence) when the config cannot work at this resolution."""

    @property
    def num_classes(self) -> int:
        return 0

    @abc.abstractmethod
    def build_network(self) -> nn.Module:
        """A freshly initialised network (weights drawn from the current torch RNG)."""

    @abc.abstractmethod
    def loss(self, net: nn.Module, images: torch.Tensor, labels: torch.Tensor | None, rng: SampleRNG) -> torch.Tensor:
        """Per-example training loss, shape (B,); every random draw comes from `rng`."""

    @abc.abstractmethod
    def denoiser(self, net: nn.Module) -> Denoiser:
        """A whole-canvas denoiser D(x, sigma, **cond) -> x0_hat built around the trained net."""

    @abc.abstractmethod
    def sampling_sigmas(self, steps: int) -> torch.Tensor:
        """The descending noise levels (ending in 0) that samplers walk for `steps` steps."""

    def bind_data(self, num_images: int) -> None:
        """Called by the training loop with the training set's size, before the network is built
        (Patch-DM sizes its per-image code table with it)."""

    def plan_step(self, seed: int, progress: float) -> StepPlan:
        """Step-level random choices from `seed` (fixed by the run seed and step); `progress` in [0, 1)."""
        return StepPlan()

    @property
    def average_multiplier(self) -> float:
        """E[plan.multiplier]: images counted per batch slot for images seen and the EMA half-life."""
        return 1.0

    # -- shared ------------------------------------------------------------------------------
    def check_canvas(self, height: int, width: int) -> None:
        """Raise ConfigError when the method cannot sample a canvas of this size."""

    def sample(
        self,
        net: nn.Module,
        rng: SampleRNG,
        height: int | None = None,
        width: int | None = None,
        labels: torch.Tensor | None = None,
        sampler: str | None = None,
        steps: int | None = None,
        guidance: float = 1.0,
        progress: bool = False,
        callback: Callable[[dict], None] | None = None,
        cond: dict | None = None,
        **options: Any,
    ) -> torch.Tensor:
        """Draw len(rng) images (B, C, H, W) in [-1, 1]; image i depends only on rng's seed i.

        `cond` replaces the conditioning built from `labels` (a method with its own, e.g. Patch-DM's codes)."""
        height = height or self.resolution[0]
        width = width or self.resolution[1]
        self.check_canvas(height, width)
        sampler = sampler or self.default_sampler
        sampler_fn = get_sampler(sampler)
        sigmas = self.sampling_sigmas(steps or self.default_steps).to(rng.device)
        if cond is None:
            cond = self.sampling_condition(labels, len(rng), rng.device)
        denoiser = self.denoiser(net)
        if guidance != 1.0:
            denoiser = self.guided(denoiser, guidance)
        if self.clip_denoised:
            denoiser = clipped(denoiser)
        x = rng.randn(*self.canvas_shape(height, width)) * sigmas[0]
        accepted = inspect.signature(sampler_fn).parameters
        options = {k: v for k, v in {**self.sampler_defaults(sampler), **options}.items() if k in accepted}
        with torch.no_grad():
            out = sampler_fn(
                denoiser, x, sigmas, extra_args=cond, noise_fn=rng.randn_like, callback=callback,
                progress=progress, **options,
            )
        return self.decode(out)

    def canvas_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, H, W) of what the sampler walks for an image of height × width (a latent is smaller)."""
        return (self.image_channels, height, width)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """The sampler's result as images in [-1, 1] (a latent method decodes it first)."""
        return x.clamp(-1, 1)

    def sampler_defaults(self, sampler: str) -> dict:
        """Options this method always passes to `sampler` (e.g. the learned variance for DDPM)."""
        return {}

    def sampling_condition(self, labels: torch.Tensor | None, batch: int, device: torch.device) -> dict:
        if self.num_classes == 0:
            return {}
        if labels is None:
            labels = torch.full((batch,), self.num_classes, dtype=torch.long)  # the null label: unconditional
        return {"class_labels": labels.to(device)}

    def guided(self, denoiser: Denoiser, scale: float) -> Denoiser:
        if self.num_classes == 0:
            raise ConfigError("guidance needs a class-conditional model (model.net.num_classes > 0)")
        from patchdiffusion.diffusion.guidance import guided

        return guided(denoiser, scale, cond_key="class_labels", null_value=self.num_classes)

    def drop_labels(self, labels: torch.Tensor | None, rng: SampleRNG, probability: float) -> torch.Tensor | None:
        """Replace labels by the null label with `probability` (classifier-free guidance training)."""
        if labels is None or self.num_classes == 0:
            return None
        if probability <= 0:
            return labels
        drop = rng.rand().to(labels.device) < probability
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

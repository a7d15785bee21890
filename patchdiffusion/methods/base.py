"""The Method interface.

A method answers one question: what does the network see, and how are its outputs put back
together? It owns
  * how a batch of training images becomes network inputs, conditioning and a loss (`loss`), and
  * how the trained network becomes a denoiser over a whole canvas (`denoiser`), which any sampler
    in `diffusion/samplers.py` can then drive (`sample`);
and it declares what the generic layers need to know about it: its model config (`Config`), its own
sampling options (`SampleOptions`, shown by `patchdiff sample --help`), named starting configs
(`presets`), named architectures (`architectures`, `--model NAME`), config files in a foreign format
(`read_config_file`) and its own command-line tools (`commands`). The CLI, the training loop and
sampling name no method: they only talk to this interface.
Methods hold no weights; the network they build is trained by the one loop in `train.py`.
"""

from __future__ import annotations

import abc
import dataclasses
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from patchdiffusion.diffusion.samplers import get_sampler
from patchdiffusion.diffusion.schedules import schedule_from_name
from patchdiffusion.diffusion.tiled import TiledDenoiser, TilingConfig, TilingError, check_tiling
from patchdiffusion.errors import ConfigError, did_you_mean
from patchdiffusion.rng import SampleRNG

Denoiser = Callable[..., Any]

# Sampler parameters that every sampler has and that the sampling code fills in itself.
_SAMPLER_PLUMBING = ("denoiser", "x", "sigmas", "extra_args", "noise_fn", "callback", "progress", "start",
                     "previous_denoised")


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


class ImageTiles:
    """A whole-image denoiser used on tiles of the training size: to the model each tile is an image,
    and it is conditioned as one (the baseline, Luhman's patching, Arakawa's grid with its own global
    content and positions inside the tile, DiMR's class). The tile model of most methods."""

    def __init__(self, denoiser: Denoiser, tile: tuple[int, int], halo: int = 0):
        self.denoiser, self.tile, self.halo = denoiser, tuple(tile), halo

    def __call__(self, x, sigma, boxes, **cond):
        return self.denoiser(x, sigma, **cond)


class GuidedTiles:
    """A tile model with the method's classifier-free guidance and x0 clipping around it (per tile, so the
    conditional and the null branch of a tile run in one call)."""

    def __init__(self, model, method: "Method", guidance: float):
        self.model, self.tile, self.halo = model, model.tile, getattr(model, "halo", 0)

        def with_boxes(x, sigma, boxes=None, **cond):
            return model(x, sigma, boxes, **cond)

        denoiser = with_boxes if guidance == 1.0 else method.guided(with_boxes, guidance)
        self.denoiser = clipped(denoiser) if method.clip_denoised else denoiser
        if hasattr(model, "check_tile"):
            self.check_tile = model.check_tile

    def __call__(self, x, sigma, boxes, **cond):
        return self.denoiser(x, sigma, boxes=boxes, **cond)


def sampler_option_names(sampler: str) -> list[str]:
    """The options a sampler accepts beyond the common plumbing (e.g. heun: S_churn, S_min, S_max, S_noise)."""
    parameters = inspect.signature(get_sampler(sampler)).parameters
    return [name for name in parameters if name not in _SAMPLER_PLUMBING]


def check_sampler_options(sampler: str, options: dict) -> None:
    """One clear line for an option the sampler does not take (a misspelling or the wrong sampler)."""
    accepted = sampler_option_names(sampler)
    for key in options:
        if key not in accepted:
            known = ", ".join(accepted) if accepted else "none"
            raise ConfigError(f"sampler '{sampler}' has no option '{key}'{did_you_mean(key, accepted)}; "
                              f"its options: {known}")


@dataclass(frozen=True)
class NoSampleOptions:
    """A method without sampling options of its own."""


@dataclass(frozen=True)
class StepPlan:
    """What one training step looks like, drawn once for the whole global batch (all processes alike).

    A method with step-level choices (Patch Diffusion's patch size) returns its own subclass; the
    training loop only reads `multiplier`."""

    multiplier: int = 1  # the step loads batch_size × multiplier examples (e.g. more, smaller patches)


@dataclass
class TrainBatch:
    """One training step's examples as the loss sees them."""

    images: torch.Tensor  # (B, C, H, W) in [-1, 1], already flipped
    labels: torch.Tensor | None  # (B,) class labels when the run uses them
    index: torch.Tensor  # (B,) each example's data set index (Patch-DM looks up per-image codes)
    plan: StepPlan  # the step's plan (the method's own StepPlan subclass)


# Parameters and FLOPs of the comparison networks of `patchdiff compare` agree within this factor (what a
# method declares in `comparison_unmatched` excepted).
COMPARISON_TOLERANCE = 1.5


@dataclass(frozen=True)
class Claim:
    """A seed paper's headline claim and what a `patchdiff compare` run says about it."""

    method: str  # whose claim
    claim: str  # the claim, one sentence
    test: str  # how the comparison's figures test it at its scale
    verdict: str  # holds | partly | does not hold | not testable
    evidence: str  # the figures, with their units


def comparison_record(records: dict[str, dict], method: str) -> dict | None:
    """The first record of `method` among a comparison's records (a claim's baseline, say), or None."""
    return next((r for r in records.values() if r.get("method") == method), None)


def record_value(record: dict, path: str):
    """A figure's value in a comparison record by dotted path ("quality.swd"); None when absent."""
    node = record
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node.get("value") if isinstance(node, dict) else node


def ratio(a, b) -> float | None:
    return None if a is None or b in (None, 0) else a / b


def time_to_reach(curve: list[dict], target: float) -> float | None:
    """Training CPU seconds at which an SWD curve [{cpu_seconds, swd}] first reaches `target` (linear between
    points; the first point's time when it is already there); None when it never does."""
    previous = None
    for point in curve:
        if point["cpu_seconds"] is None:
            continue
        if point["swd"] <= target:
            if previous is None:
                return point["cpu_seconds"]
            (t0, v0), (t1, v1) = previous, (point["cpu_seconds"], point["swd"])
            return t0 + (v0 - target) / (v0 - v1) * (t1 - t0) if v0 != v1 else t1
        previous = (point["cpu_seconds"], point["swd"])
    return None


@dataclass(frozen=True)
class Command:
    """A method's own command-line tool, `patchdiff NAME ...` (e.g. Patch-DM's train-codes).

    `name` may hold a space for a tool under a group ("patchdm init-codes")."""

    name: str
    help: str
    add_arguments: Callable[[Any], None]  # (argparse parser) -> None
    run: Callable[[Any], int]  # (parsed arguments) -> exit code


class Method(abc.ABC):
    name: ClassVar[str]
    Config: ClassVar[type]
    SampleOptions: ClassVar[type] = NoSampleOptions  # frozen dataclass; its field metadata "help" feeds --help
    default_sampler: ClassVar[str] = "heun"
    default_steps: ClassVar[int] = 18
    clip_denoised: ClassVar[bool] = False  # clamp x0_hat to [-1, 1] after guidance (DDPM's clip_denoised)
    # name -> (what it is for, key=value overrides); `patchdiff train --preset NAME`
    presets: ClassVar[dict[str, tuple[str, list[str]]]] = {}
    # named network architectures, `patchdiff train --model NAME` (see `architecture_overrides`)
    architectures: ClassVar[tuple[str, ...]] = ()
    config_suffixes: ClassVar[tuple[str, ...]] = ()  # foreign config files this method reads (`read_config_file`)
    commands: ClassVar[tuple[Command, ...]] = ()
    # `patchdiff compare`: figures of the comparison network deliberately not matched to the other methods'
    # ("params" or "flops" -> why), e.g. a method whose claim is fewer FLOPs at equal parameters
    comparison_unmatched: ClassVar[dict[str, str]] = {}

    def __init__(self, config: Any, resolution: tuple[int, int], image_channels: int = 3):
        self.config = config
        self.resolution = tuple(resolution)  # (height, width) of training images
        self.image_channels = image_channels
        self.run_dir: Path | None = None
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
    def loss(self, net: nn.Module, batch: TrainBatch, rng: SampleRNG) -> torch.Tensor:
        """Per-example training loss, shape (B,); every random draw comes from `rng`."""

    @abc.abstractmethod
    def denoiser(self, net: nn.Module, options: Any = None) -> Denoiser:
        """A whole-canvas denoiser D(x, sigma, **cond) -> x0_hat built around the trained net.
        `options`: the method's SampleOptions (None = defaults)."""

    @abc.abstractmethod
    def sampling_sigmas(self, steps: int) -> torch.Tensor:
        """The descending noise levels (ending in 0) that samplers walk for `steps` steps."""

    def bind_data(self, num_images: int) -> None:
        """Called by the training loop with the training set's size, before the network is built
        (Patch-DM sizes its per-image code table with it)."""

    def attach_run(self, run_dir: str | Path) -> None:
        """Called when a trained run is loaded, so a method can find what it keeps beside the
        checkpoints (Patch-DM's latent code model)."""
        self.run_dir = Path(run_dir)

    def plan_step(self, seed: int, progress: float) -> StepPlan:
        """Step-level random choices from `seed` (fixed by the run seed and step); `progress` in [0, 1)."""
        return StepPlan()

    @property
    def average_multiplier(self) -> float:
        """E[plan.multiplier]: images counted per batch slot for images seen and the EMA half-life."""
        return 1.0

    @classmethod
    def architecture_overrides(cls, name: str) -> list[str]:
        """The key=value overrides of the named architecture (`--model NAME`)."""
        from patchdiffusion.registry import method_classes

        others = [c.name for c in method_classes() if c.architectures]
        raise ConfigError(f"method '{cls.name}' has no named architectures for --model "
                          f"(methods that have them: {', '.join(others) or 'none'})")

    @classmethod
    def comparison_overrides(cls, resolution: tuple[int, int]) -> list[str]:
        """key=value overrides (model.* and sample.*) of this method's entry in `patchdiff compare` at
        `resolution` (h, w): a CPU-sized network matched to the baseline U-Net of `full` (about 1.2M
        parameters and 250M multiply-adds per 32² image; `COMPARISON_TOLERANCE`), with the method's own recipe.
        Training settings (batch, learning rate, EMA, budget) are the comparison's, the same for all."""
        raise ConfigError(f"method '{cls.name}' has no network for `patchdiff compare` "
                          "(Method.comparison_overrides); give a run directory of it instead")

    @classmethod
    def comparison_claims(cls, records: dict[str, dict]) -> list["Claim"]:
        """The method's seed's headline claims, judged from a comparison's records (label -> record, the
        fields documented in `patchdiffusion/compare.py`); [] when the method makes none that can be tested."""
        return []

    @classmethod
    def read_config_file(cls, path: Path) -> tuple[Any, Path | None]:
        """A RunConfig (and the run directory it names, if any) from a foreign config file."""
        raise ConfigError(f"method '{cls.name}' reads no '{path.suffix}' config files")

    # -- shared ------------------------------------------------------------------------------
    def check_canvas(self, height: int, width: int) -> None:
        """Raise ConfigError when the method cannot sample a canvas of this size in one piece."""

    def check_tiled_canvas(self, height: int, width: int) -> None:
        """Raise ConfigError when the method cannot sample an image of this size from tiles (a latent
        method needs sides divisible by its VAE's factor)."""

    # -- any size: tiles --------------------------------------------------------------------------
    @property
    def native_tile(self) -> tuple[int, int]:
        """(h, w) of a tile in canvas units: what the network was trained on (the latent of it for a
        latent method)."""
        return tuple(self.canvas_shape(*self.resolution)[1:])

    def tile_model(self, net: nn.Module, options: Any = None):
        """How a tile of a larger canvas is denoised and conditioned (`diffusion/tiled.py: TileModel`).
        Default: the method's denoiser on each tile, as on an image of the training size."""
        return ImageTiles(self.denoiser(net, options), self.native_tile)

    def default_tiling(self) -> TilingConfig:
        """The tiling this method samples large canvases with unless told otherwise (see docs/any_size.md
        for the measurements behind each method's choice)."""
        return TilingConfig(window="cosine", grid="random")

    def tiled_denoiser(self, net: nn.Module, options: Any = None, guidance: float = 1.0,
                       tiling: TilingConfig | None = None, device=None, on_tiles=None) -> TiledDenoiser:
        """A denoiser over whole canvases of any size made of tile calls, guidance and clipping per tile."""
        model = GuidedTiles(self.tile_model(net, options), self, guidance)
        try:
            return TiledDenoiser(model, tiling or self.default_tiling(), device=device, on_tiles=on_tiles)
        except TilingError as e:
            raise ConfigError(str(e)) from None

    def check_tiling(self, height: int, width: int, tiling: TilingConfig | None, net: nn.Module | None = None,
                     options: Any = None) -> None:
        """One clear line, before any work, when an H×W image cannot be made from tiles this way."""
        self.check_tiled_canvas(height, width)
        model = self.tile_model(net, options) if net is not None else ImageTiles(None, self.native_tile)
        canvas = tuple(self.canvas_shape(height, width)[1:])
        try:
            check_tiling(canvas, tiling or self.default_tiling(), model)
        except TilingError as e:
            raise ConfigError(str(e)) from None

    @classmethod
    def make_options(cls, values: dict | None = None) -> Any:
        """The method's SampleOptions from a mapping; an unknown name is one clear line."""
        values = dict(values or {})
        names = [f.name for f in dataclasses.fields(cls.SampleOptions)]
        for key in values:
            if key not in names:
                known = ", ".join(names) if names else "none"
                raise ConfigError(f"method '{cls.name}' has no sampling option '{key}'{did_you_mean(key, names)}; "
                                  f"its options: {known}")
        return cls.SampleOptions(**values)

    def sample(
        self,
        net: nn.Module,
        rng: SampleRNG,
        height: int | None = None,
        width: int | None = None,
        *,
        labels: torch.Tensor | None = None,
        sampler: str | None = None,
        steps: int | None = None,
        guidance: float = 1.0,
        sampler_options: dict | None = None,
        options: Any = None,
        tiling: TilingConfig | None = None,
        progress: bool = False,
        callback: Callable[[dict], None] | None = None,
    ) -> torch.Tensor:
        """Draw len(rng) images (B, C, H, W) in [-1, 1]; image i depends only on rng's seed i.

        sampler_options: options of the sampler (e.g. S_churn for heun); one it does not take is an
        error. options: the method's SampleOptions (or a mapping of them). tiling: sample the canvas
        from tiles of the model's size (diffusion/tiled.py), in memory; `sample.generate_canvas` is the
        out-of-core path for canvases that do not fit."""
        height = height or self.resolution[0]
        width = width or self.resolution[1]
        sampler = sampler or self.default_sampler
        sampler_fn = get_sampler(sampler)
        check_sampler_options(sampler, sampler_options or {})
        options = options if isinstance(options, self.SampleOptions) else self.make_options(options)
        sigmas = self.sampling_sigmas(steps or self.default_steps).to(rng.device)
        cond = self.sampling_condition(net, rng, labels, options)
        if tiling is not None:
            self.check_tiling(height, width, tiling, net, options)
            denoiser = self.tiled_denoiser(net, options, guidance, tiling)
            denoiser.set_schedule(sigmas)
        else:
            self.check_canvas(height, width)
            denoiser = self.denoiser(net, options)
            if guidance != 1.0:
                denoiser = self.guided(denoiser, guidance)
            if self.clip_denoised:
                denoiser = clipped(denoiser)
        x = rng.randn(*self.canvas_shape(height, width)) * sigmas[0]
        with torch.no_grad():
            out = sampler_fn(
                denoiser, x, sigmas, extra_args=cond, noise_fn=rng.randn_like, callback=callback,
                progress=progress, **{**self.sampler_defaults(sampler), **(sampler_options or {})},
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

    def sampling_condition(self, net: nn.Module, rng: SampleRNG, labels: torch.Tensor | None, options: Any) -> dict:
        """The conditioning keywords of the denoiser for len(rng) images (class labels; Patch-DM: codes)."""
        if self.num_classes == 0:
            if labels is not None:
                raise ConfigError("class labels were given but the model is unconditional (model.net.num_classes = 0)")
            return {}
        if labels is None:
            labels = torch.full((len(rng),), self.num_classes, dtype=torch.long)  # the null label: unconditional
        return {"class_labels": labels.to(rng.device)}

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

"""Patch-DM's global semantic codes (Ding et al. 2024, §3.3): CLIP initialisation and the latent code model.

* `init_codes`: one code per training image, its CLIP image embedding (the reference's
  `initialize.py` uses CLIP ViT-B/16 `encode_image`, 512-d). Here the model is HF transformers'
  `CLIPVisionModelWithProjection` loaded from a local directory (never downloaded); images get
  CLIP's own preprocessing (shortest side resized bicubic to the model's input side, centre crop,
  CLIP mean/std), from the directory's preprocessor_config.json when it has one. Row i of the
  table belongs to image i of the data set, the index the training loop passes to the method.
* The latent code model (the reference's `train_latent.py`, DiffAE's latent DDIM): a diffusion
  model over the learned code table, read straight from the trained network (no inference pass),
  so unconditional sampling draws a new code first and then the image. DiffAE's MLPSkipNet:
  10 layers of width 2048, the input code concatenated again before layers 1..9, each layer
  Linear → ·(1 + time scale) → LayerNorm → SiLU; constant β = 0.008 for T = 1000, ε-prediction,
  L1 loss, AdamW (weight decay 0.01), batch 512; sampled with DDIM (50 steps).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from patchdiffusion.errors import ConfigError
from patchdiffusion.nets.layers import timestep_embedding

CODES_KEY = "codes"


# ------------------------------------------------------------------------------------------------
# Code files


def save_codes(codes: torch.Tensor, path: str | Path, metadata: dict | None = None) -> Path:
    """Write a (N, K) code table as safetensors (key "codes"), atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({CODES_KEY: codes.detach().float().cpu().contiguous()}, str(tmp),
              metadata={k: str(v) for k, v in (metadata or {}).items()})
    tmp.replace(path)
    return path


def load_codes(path: str | Path) -> torch.Tensor:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"codes file '{path}' does not exist (make one with `patchdiff patchdm init-codes`)")
    tensors = load_file(str(path))
    if CODES_KEY not in tensors or tensors[CODES_KEY].ndim != 2:
        raise ConfigError(f"'{path}' holds no (N, K) tensor named '{CODES_KEY}'")
    return tensors[CODES_KEY]


# ------------------------------------------------------------------------------------------------
# CLIP initialisation

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's pixel normalisation (OpenAI)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def load_clip(path: str | Path, device: str | torch.device = "cpu"):
    """(model, image processor) from a local save_pretrained directory; nothing is downloaded."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"'{path}' is not a local CLIP directory (no config.json); point --clip at one")
    try:
        from transformers import CLIPVisionModelWithProjection
    except ImportError:
        raise ConfigError("init-codes needs HF transformers: pip install 'patchdiffusion[clip]'") from None
    model = CLIPVisionModelWithProjection.from_pretrained(str(path), local_files_only=True)
    return model.to(device).eval(), clip_processor(path, model.config.image_size)


def clip_processor(path: Path, image_size: int):
    """CLIP's image processor (PIL backend, no torchvision): the directory's own settings, else CLIP's
    defaults at the model's input side."""
    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:  # older transformers: the PIL processor is the default one
        from transformers import CLIPImageProcessor as Processor
    if (path / "preprocessor_config.json").is_file():
        return Processor.from_pretrained(str(path), local_files_only=True)
    return Processor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                     image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))


@torch.no_grad()
def clip_embeddings(model, processor, images: list[np.ndarray]) -> torch.Tensor:
    """CLIP image embeddings (projection output, not normalised) of uint8 (H, W, 3) images: (N, K)."""
    device = next(model.parameters()).device
    pixels = processor(images=list(images), return_tensors="pt")["pixel_values"].to(device)
    return model(pixel_values=pixels).image_embeds.float().cpu()


def init_codes(data: str, clip_path: str | Path, out: str | Path, resolution: tuple[int, int] | None = None,
               batch_size: int = 128, device: str = "cpu", progress: bool = True) -> torch.Tensor:
    """Embed every image of `data` with CLIP and write the (N, K) table to `out` (row i = image i).

    resolution: (width, height) the training set is read at (as `data.resolution`); None = as stored."""
    from patchdiffusion.data import open_source
    from patchdiffusion.data.transforms import apply_transform

    source = open_source(data, resolution=resolution) if resolution else open_source(data)
    model, processor = load_clip(clip_path, device)
    rows = []
    starts = range(0, len(source), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="init-codes", unit="batch")
    for start in starts:
        images = []
        for i in range(start, min(start + batch_size, len(source))):
            pixels = source.read(i)
            if resolution and pixels.shape[:2] != (resolution[1], resolution[0]):
                pixels = apply_transform(pixels, resolution[0], resolution[1], "center-crop")
            images.append(pixels)
        rows.append(clip_embeddings(model, processor, images))
    codes = torch.cat(rows)
    save_codes(codes, out, {"data": data, "clip": str(clip_path), "count": len(codes)})
    return codes


# ------------------------------------------------------------------------------------------------
# The latent code model


@dataclass
class LatentCodeConfig:
    hidden: int = 2048                   # MLPSkipNet width (DiffAE / reference: 2048)
    num_layers: int = 10                 # layers; the input code is concatenated before layers 1..num_layers−1
    time_channels: int = 64              # sinusoid width of the timestep
    schedule: str = "const0.008"         # β schedule (reference: constant 0.008)
    timesteps: int = 1000                # T
    loss: str = "l1"                     # l1 (reference) | l2
    batch_size: int = 512                # codes per step
    steps: int = 117000                  # optimizer steps (reference: 60M samples / 512)
    lr: float = 1e-4                     # AdamW learning rate
    weight_decay: float = 0.01           # AdamW weight decay (reference)
    normalize: bool = False              # z-normalise the codes per dimension (reference flag, off by default)
    sample_steps: int = 50               # DDIM steps when drawing codes (reference eval: 50)
    seed: int = 0                        # batch order and noise


class MLPSkipNet(nn.Module):
    """DiffAE's MLPSkipNet: ε(z_t, t) for codes z of width K."""

    def __init__(self, code_dim: int, config: LatentCodeConfig):
        super().__init__()
        H, L = config.hidden, config.num_layers
        self.time_channels = config.time_channels
        self.time_embed = nn.Sequential(nn.Linear(config.time_channels, H), nn.SiLU(), nn.Linear(H, H))
        self.linears = nn.ModuleList()
        self.time_scales = nn.ModuleList()
        self.norms = nn.ModuleList()
        for i in range(L):
            last = i == L - 1
            width_in = code_dim if i == 0 else H + code_dim  # skip: the input again before layers 1..L−1
            self.linears.append(nn.Linear(width_in, code_dim if last else H))
            if not last:
                self.time_scales.append(nn.Linear(H, H))
                self.norms.append(nn.LayerNorm(H))

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=z.device, dtype=torch.float32).reshape(-1).expand(z.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.time_channels))  # (B, H)
        h = z
        for i, linear in enumerate(self.linears):
            if i > 0:
                h = torch.cat([h, z], dim=1)  # (B, H + K)
            h = linear(h)
            if i < len(self.norms):
                h = h * (1 + self.time_scales[i](emb))  # time as a scale (condition_bias 1)
                h = torch.nn.functional.silu(self.norms[i](h))
        return h  # (B, K)


@dataclass
class LatentCodeModel:
    """A trained code model: net + schedule + the table's normalisation."""

    net: MLPSkipNet
    config: LatentCodeConfig
    mean: torch.Tensor  # (K,) subtracted before diffusion (0 without normalize)
    std: torch.Tensor  # (K,) divided (1 without normalize)

    @property
    def schedule(self):
        from patchdiffusion.diffusion.schedules import schedule_from_name

        return schedule_from_name(self.config.schedule, self.config.timesteps)

    @torch.no_grad()
    def sample(self, rng, steps: int | None = None) -> torch.Tensor:
        """len(rng) codes (B, K), code i from rng's seed i (DDIM, η = 0)."""
        from patchdiffusion.diffusion.precond import DiscretePrecond
        from patchdiffusion.diffusion.samplers import sample_ddim

        schedule = self.schedule
        sigmas = schedule.sigmas_for_sampling(steps or self.config.sample_steps).float()
        K = self.mean.numel()
        device = next(self.net.parameters()).device
        x = rng.randn(K).to(device) * sigmas[0]
        z = sample_ddim(DiscretePrecond(self.net, schedule, prediction="eps"), x, sigmas)
        return z * self.std.to(device) + self.mean.to(device)

    def save(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        from patchdiffusion.config import to_dict

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        state["_norm.mean"], state["_norm.std"] = self.mean.cpu().float(), self.std.cpu().float()
        tmp = folder / "net.safetensors.tmp"
        save_file(state, str(tmp))
        tmp.replace(folder / "net.safetensors")
        (folder / "config.json").write_text(json.dumps({"code_dim": int(self.mean.numel()), **to_dict(self.config)}))
        return folder

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> "LatentCodeModel":
        from safetensors.torch import load_file

        from patchdiffusion.config import from_dict

        folder = Path(folder)
        if not (folder / "net.safetensors").is_file():
            raise ConfigError(f"no latent code model in '{folder}' (train one with `patchdiff train-codes --run RUN`)")
        values = json.loads((folder / "config.json").read_text())
        code_dim = int(values.pop("code_dim"))
        config = from_dict(LatentCodeConfig, values)
        state = load_file(str(folder / "net.safetensors"))
        mean, std = state.pop("_norm.mean"), state.pop("_norm.std")
        net = MLPSkipNet(code_dim, config)
        net.load_state_dict(state)
        return cls(net.to(device).eval(), config, mean, std)


def train_code_model(codes: torch.Tensor, config: LatentCodeConfig, device: str | torch.device = "cpu",
                     log=print, progress: bool = False) -> tuple[LatentCodeModel, list[float]]:
    """Fit the latent code model to a (N, K) table; returns the model and the loss per step."""
    from patchdiffusion.diffusion.losses import DDPMLoss
    from patchdiffusion.diffusion.schedules import schedule_from_name
    from patchdiffusion.rng import SampleRNG, mix_seed

    codes = codes.detach().float().to(device)
    N, K = codes.shape
    if N < 2:
        raise ConfigError("the latent code model needs at least 2 codes")
    mean = codes.mean(0) if config.normalize else torch.zeros(K, device=device)
    std = codes.std(0).clamp(min=1e-6) if config.normalize else torch.ones(K, device=device)
    data = (codes - mean) / std
    try:
        schedule = schedule_from_name(config.schedule, config.timesteps)
    except ValueError as e:
        raise ConfigError(f"latent.schedule: {e}") from None
    torch.manual_seed(mix_seed(config.seed, 0))
    net = MLPSkipNet(K, config).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    loss_fn = DDPMLoss(schedule, prediction="eps", loss_type=config.loss)
    generator = torch.Generator().manual_seed(mix_seed(config.seed, 1))
    losses = []
    steps = range(config.steps)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="train-codes", unit="step")
    for step in steps:
        index = torch.randint(0, N, (config.batch_size,), generator=generator)
        rng = SampleRNG([mix_seed(config.seed, 2, step, k) for k in range(config.batch_size)], device)
        loss = loss_fn(net, data[index.to(device)], rng).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if log and (step + 1) % max(1, config.steps // 10) == 0:
            log(f"train-codes: step {step + 1}/{config.steps}, loss {np.mean(losses[-50:]):.4f}")
    return LatentCodeModel(net.eval(), config, mean.cpu(), std.cpu()), losses


def code_frechet_report(real: torch.Tensor, sampled: torch.Tensor, seed: int = 0) -> dict:
    """Fréchet distances to the real code table: of sampled codes, of N(0, I) noise, and of noise with
    the table's per-dimension mean and std (a harder baseline: right marginals, no correlations)."""
    from patchdiffusion.eval.frechet import feature_statistics, frechet_distance_between

    real = real.double().cpu().numpy()
    sampled = sampled.double().cpu().numpy()
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((len(sampled), real.shape[1]))
    matched = noise * real.std(0) + real.mean(0)
    ref = feature_statistics(real)
    return {
        "num_real": len(real), "num_sampled": len(sampled), "code_dim": real.shape[1],
        "fd_sampled": frechet_distance_between(ref, feature_statistics(sampled)),
        "fd_gaussian_noise": frechet_distance_between(ref, feature_statistics(noise)),
        "fd_marginal_matched_noise": frechet_distance_between(ref, feature_statistics(matched)),
        "fd_real_resampled": frechet_distance_between(
            ref, feature_statistics(real[rng.integers(0, len(real), len(sampled))])),
    }


def train_codes_for_run(run_dir: str | Path, overrides: list[str] | None = None, device: str = "cpu",
                        num_eval: int = 0, log=print, progress: bool = True) -> dict:
    """`patchdiff train-codes --run DIR`: fit the latent code model to the run's (EMA) code table,
    save it in RUN/codes_model/, and report Fréchet distances of sampled codes."""
    from patchdiffusion.config import apply_overrides
    from patchdiffusion.rng import SampleRNG, mix_seed
    from patchdiffusion.run import load_run

    loaded = load_run(run_dir, "cpu", use_ema=True)
    if loaded.config.method != "patch_dm":
        raise ConfigError(f"train-codes is for patch_dm runs; '{run_dir}' is a '{loaded.config.method}' run")
    config = loaded.config
    if overrides:
        config = apply_overrides(config, [o if o.startswith(("model.latent.", "latent.")) else f"model.latent.{o}"
                                          for o in overrides])
    table = loaded.method.code_table(loaded.net)
    log(f"train-codes: {table.shape[0]} codes of width {table.shape[1]} from {loaded.checkpoint.path}")
    model, losses = train_code_model(table, config.model.latent, device, log=log, progress=progress)
    folder = model.save(loaded.method.latent_dir(run_dir))
    count = num_eval or max(2 * table.shape[0], 256)
    sampled = model.sample(SampleRNG([mix_seed(5, i) for i in range(count)], device))
    report = {"run": str(run_dir), "final_loss": float(np.mean(losses[-50:])), "steps": len(losses),
              **code_frechet_report(table, sampled)}
    (folder / "report.json").write_text(json.dumps(report, indent=2))
    log(f"train-codes: saved {folder}; Fréchet distance to the table: sampled {report['fd_sampled']:.4g}, "
        f"N(0, I) noise {report['fd_gaussian_noise']:.4g}, "
        f"marginal-matched noise {report['fd_marginal_matched_noise']:.4g}")
    return report


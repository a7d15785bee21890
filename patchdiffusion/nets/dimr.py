"""DiMR's Multi-Resolution Network (Liu et al. 2024, "Alleviating Distortion in Image Generation via
Multi-Resolution Diffusion Models", arXiv 2406.09416), as its reference code (`MRModel`) builds it.

R stages run from low to high resolution on the same noisy input x (B, C, H, W):

  stage 1  Transformer (U-ViT layout): x -> [area-downsample] -> conv k=s=p -> + position table
           -> [class token] -> in-blocks, mid-block, out-blocks (each out-block after Linear(2d -> d)
           on [x, popped skip]) -> TD-LayerNorm -> conv 3×3 -> ε̂ at this stage's resolution.
  stage k  ConvNeXt blocks (x += DWConv7×7(x); x += GatedMLP(TD-RMSNorm(x))) in the same layout, at
           a higher resolution, whose input also receives every feature map of stage k−1:
           concat(all of them, channels) -> TD-LayerNorm -> Linear -> pixel-shuffle ↑ -> TD-LayerNorm.

The forward returns one ε̂ per stage, low to high resolution; the last one is the model's output.
There is no time embedding: time enters only through the time-dependent norms (`nets/tdln.py`).
The class enters only as stage 1's in-context token; later stages see it through stage 1's features.

Shapes for DiMR-XL/2R on 32×32×4 latents: stage 1 works on 16×16 = 256 tokens (+1 class token),
width 960, 39 blocks (19 + 1 + 19); its 40 maps (embedded input + every block) give 38 400 channels
at 16×16, shuffled up to 32×32×480 for stage 2 (20 -> 21 ConvNeXt blocks, 10 + 1 + 10).
Outputs: [(B, 4, 16, 16), (B, 4, 32, 32)].
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from patchdiffusion.config import Range

from .tdln import NORM_KINDS, TimeEmbedding, make_norm, shared_time, time_coordinate

__all__ = [
    "StageConfig",
    "DiMRNetConfig",
    "DiMRNet",
    "DIMR_PRESETS",
    "dimr_config",
    "stage_resolutions",
    "check_dimr_config",
    "complexity",
]

BLOCK_TYPES = ("transformer", "convnext")


@dataclass
class StageConfig:
    block: str = "transformer"       # transformer (U-ViT self-attention blocks) | convnext (7×7 depthwise conv blocks)
    dim: int = 128                   # width of the stage's features
    hidden_dim: int = 256            # hidden width of the gated MLP
    num_blocks: int = 5              # as the reference config counts: num_blocks//2·2 + 1 blocks are built (in, mid, out)
    heads: int = 4                   # attention heads (transformer)
    kernel_size: int = 7             # depthwise kernel (convnext)
    input_downsample: int = 1        # area-downsample the noisy input by this first (reference image_input_ratio)
    patch_size: int = 1              # then a conv with kernel = stride = patch_size (reference input_feature_ratio)
    output_kernel: int = 3           # kernel of the output conv predicting ε at this stage's resolution
    dropout: float = 0.0             # dropout on each residual branch

    RANGES: ClassVar[dict] = {
        "dim": Range(1, 1 << 16), "hidden_dim": Range(1, 1 << 16), "num_blocks": Range(1, 1024), "heads": Range(1, 1024),
        "kernel_size": Range(1, 255), "input_downsample": Range(1, 1 << 10), "patch_size": Range(1, 1 << 10),
        "output_kernel": Range(1, 255), "dropout": Range(0, 1),
    }
    CHOICES: ClassVar[dict] = {"block": ("transformer", "convnext")}

    @property
    def factor(self) -> int:
        """Input side / this stage's side."""
        return self.input_downsample * self.patch_size

    @property
    def depth(self) -> int:
        """Blocks actually built: in-blocks + mid-block + out-blocks."""
        return self.num_blocks // 2 * 2 + 1


@dataclass
class DiMRNetConfig:
    in_channels: int = 3             # image (or latent) channels; every stage predicts this many
    num_classes: int = 0             # classes (0 = unconditional); label num_classes is the null label (guidance)
    stages: tuple[StageConfig, ...] = ()  # low to high resolution
    norm: str = "td"                 # td: DiMR's time-dependent norms | adaln: time embedding + adaLN (ablation)
    adaln_embed_dim: int = 0         # adaLN time-embedding width (0 = stage 1's dim); unused with td
    num_timesteps: int = 1000        # T of the discrete schedule: τ = 2(t + 1)/T − 1 for zero-based t
    block_grad_to_lowres: bool = False  # detach stage k's features before stage k+1 (reference flag; off)
    checkpointing: bool = False      # gradient checkpointing per block (the reference always does; saves memory)
    canvas: tuple[int, int] = (0, 0)  # (H, W) of the input the position tables are built for; set by the method

    RANGES: ClassVar[dict] = {"in_channels": Range(1, 1 << 16), "num_classes": Range(0, 1 << 24), "adaln_embed_dim": Range(0, 1 << 16),
                               "num_timesteps": Range(2, 1e6), "canvas": Range(0, 1 << 20)}
    CHOICES: ClassVar[dict] = {"norm": ("td", "adaln")}


# ------------------------------------------------------------------------------------------------
# Presets, keyed by the paper's names (configs/DiMR-*-2R_imagenet256.py of the reference repository).


def _xl() -> DiMRNetConfig:
    return DiMRNetConfig(in_channels=4, num_classes=1000, stages=(
        StageConfig("transformer", dim=960, hidden_dim=1920, num_blocks=39, heads=16, patch_size=2),
        StageConfig("convnext", dim=480, hidden_dim=960, num_blocks=20, kernel_size=7),
    ))


def _g() -> DiMRNetConfig:
    return DiMRNetConfig(in_channels=4, num_classes=1000, stages=(
        StageConfig("transformer", dim=1152, hidden_dim=2304, num_blocks=57, heads=16, patch_size=2),
        StageConfig("convnext", dim=576, hidden_dim=1152, num_blocks=29, kernel_size=7),
    ))


def _tiny() -> DiMRNetConfig:
    # Two stages like XL/2R at CPU scale, the transformer on 4×4 patches (16 tokens on a 16² image:
    # cheap, and the class token is 1 of 17), ConvNeXt at full size; 10 classes for builtin:digits.
    return DiMRNetConfig(in_channels=3, num_classes=10, stages=(
        StageConfig("transformer", dim=128, hidden_dim=256, num_blocks=5, heads=4, patch_size=4),
        StageConfig("convnext", dim=32, hidden_dim=64, num_blocks=4, kernel_size=7),
    ))


DIMR_PRESETS: dict[str, Callable[[], DiMRNetConfig]] = {
    "dimr-xl-2r": _xl,    # 505M parameters, 160 GFLOPs on 32×32×4 latents (paper, Table 1)
    "dimr-g-2r": _g,      # 1.06B parameters, 331 GFLOPs
    "dimr-tiny": _tiny,   # trains on a CPU in minutes
}


def dimr_config(name: str, **overrides) -> DiMRNetConfig:
    """The net config of a preset (DIMR_PRESETS), with field overrides."""
    if name not in DIMR_PRESETS:
        raise KeyError(f"unknown DiMR model '{name}' (choose from: {', '.join(DIMR_PRESETS)})")
    return dataclasses.replace(DIMR_PRESETS[name](), **overrides)


def stage_resolutions(config: DiMRNetConfig, height: int, width: int) -> list[tuple[int, int]]:
    """(h, w) each stage works at for an input of height × width."""
    return [(height // s.factor, width // s.factor) for s in config.stages]


def check_dimr_config(config: DiMRNetConfig, height: int, width: int) -> None:
    """Raise ValueError (one sentence) when the network cannot be built for height × width."""
    if not config.stages:
        raise ValueError("the DiMR net needs at least one stage")
    if config.norm not in NORM_KINDS:
        raise ValueError(f"norm must be one of {', '.join(NORM_KINDS)}, got {config.norm!r}")
    for k, s in enumerate(config.stages, 1):
        if s.block not in BLOCK_TYPES:
            raise ValueError(f"stage {k}: block must be one of {', '.join(BLOCK_TYPES)}, got {s.block!r}")
        if s.input_downsample < 1 or s.patch_size < 1 or s.num_blocks < 1:
            raise ValueError(f"stage {k}: input_downsample, patch_size and num_blocks must be >= 1")
        if height % s.factor or width % s.factor:
            raise ValueError(
                f"stage {k}: size {width}x{height} is not divisible by its factor {s.factor} "
                f"(input_downsample {s.input_downsample} × patch_size {s.patch_size})"
            )
        if s.block == "transformer" and s.dim % s.heads:
            raise ValueError(f"stage {k}: dim {s.dim} is not divisible by heads {s.heads}")
    for k in range(1, len(config.stages)):
        low, high = config.stages[k - 1].factor, config.stages[k].factor
        if low % high:
            raise ValueError(
                f"stage {k + 1} must run at an integer multiple of stage {k}'s resolution (factors {low} and {high})"
            )


# ------------------------------------------------------------------------------------------------
# Layers


def _linear(d_in: int, d_out: int, bias: bool = True) -> nn.Linear:
    """nn.Linear with the reference's init: truncated normal (std 0.02) weights, zero bias."""
    layer = nn.Linear(d_in, d_out, bias=bias)
    nn.init.trunc_normal_(layer.weight, std=0.02)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


class GatedMLP(nn.Module):
    """norm -> W2(GELU(W0 x) ⊙ W1 x): the MLP of both block types."""

    def __init__(self, dim: int, hidden: int, norm: str, embed_dim: int):
        super().__init__()
        self.norm = make_norm(norm, dim, "rms", embed_dim)
        self.w0, self.w1, self.w2 = _linear(dim, hidden), _linear(dim, hidden), _linear(hidden, dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        x = self.norm(x, cond)
        return self.w2(F.gelu(self.w0(x)) * self.w1(x))


class SelfAttention(nn.Module):
    """norm -> fused QKV (no bias) -> scaled dot-product attention -> output projection."""

    def __init__(self, dim: int, heads: int, norm: str, embed_dim: int):
        super().__init__()
        self.heads = heads
        self.norm = make_norm(norm, dim, "rms", embed_dim)
        self.qkv = _linear(dim, 3 * dim, bias=False)
        self.proj = _linear(dim, dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(self.norm(x, cond)).reshape(B, N, 3, self.heads, C // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, N, C/heads)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, C/heads)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class TransformerBlock(nn.Module):
    """x += Attn(norm(x)); x += GatedMLP(norm(x)) on tokens (B, N, C)."""

    def __init__(self, s: StageConfig, norm: str, embed_dim: int):
        super().__init__()
        self.attn = SelfAttention(s.dim, s.heads, norm, embed_dim)
        self.mlp = GatedMLP(s.dim, s.hidden_dim, norm, embed_dim)
        self.dropout = nn.Dropout(s.dropout)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attn(x, cond))
        return x + self.dropout(self.mlp(x, cond))


class ConvNeXtBlock(nn.Module):
    """x += DWConv(x) (no norm before it, as in the reference); x += GatedMLP(norm(x)); x is (B, H, W, C)."""

    def __init__(self, s: StageConfig, norm: str, embed_dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(s.dim, s.dim, s.kernel_size, padding=s.kernel_size // 2, groups=s.dim)
        self.mlp = GatedMLP(s.dim, s.hidden_dim, norm, embed_dim)
        self.dropout = nn.Dropout(s.dropout)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        conv = self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # channel-first for the conv, back
        x = x + self.dropout(conv)
        return x + self.dropout(self.mlp(x, cond))


class PixelShuffleUp(nn.Module):
    """Linear(d_in -> d_out·r²), then each token's r·r groups of d_out become an r×r block:
    (B, h, w, d_in) -> (B, h·r, w·r, d_out)."""

    def __init__(self, d_in: int, d_out: int, ratio: int):
        super().__init__()
        self.ratio = ratio
        self.linear = _linear(d_in, d_out * ratio * ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        B, h, w, _ = x.shape
        r = self.ratio
        x = x.reshape(B, h, w, r, r, -1).permute(0, 1, 3, 2, 4, 5)  # (B, h, r, w, r, d_out)
        return x.reshape(B, h * r, w * r, -1)


class Upsampler(nn.Module):
    """The low-resolution stage's concatenated features -> this stage's resolution and width:
    TD-LayerNorm -> PixelShuffleUp -> TD-LayerNorm."""

    def __init__(self, d_in: int, d_out: int, ratio: int, norm: str, embed_dim: int):
        super().__init__()
        self.norm_in = make_norm(norm, d_in, "ln", embed_dim)
        self.shuffle = PixelShuffleUp(d_in, d_out, ratio)
        self.norm_out = make_norm(norm, d_out, "ln", embed_dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.norm_out(self.shuffle(self.norm_in(x, cond)), cond)


class Stage(nn.Module):
    """One resolution: input embedding, U-ViT-layout blocks with long skips, an ε head.

    Returns (ε̂ (B, C, h, w), features (B, h, w, (depth + 1)·dim)): the embedded input and every
    block's output, concatenated on channels, for the next stage (class token removed)."""

    def __init__(self, s: StageConfig, config: DiMRNetConfig, size: tuple[int, int],
                 lowres: tuple[int, int] | None, embed_dim: int):
        super().__init__()
        self.s, self.norm_kind, self.checkpointing = s, config.norm, config.checkpointing
        self.patch = nn.Conv2d(config.in_channels, s.dim, s.patch_size, stride=s.patch_size)
        self.position = nn.Parameter(torch.empty(1, size[0], size[1], s.dim))  # learned absolute positions
        nn.init.trunc_normal_(self.position, std=0.02)
        self.class_embed = None
        if s.block == "transformer" and config.num_classes > 0:
            self.class_embed = nn.Embedding(config.num_classes + 1, s.dim)  # + the null label
            nn.init.trunc_normal_(self.class_embed.weight, std=0.02)
        self.upsample = None
        if lowres is not None:  # (features of the lower stage, its side ratio to this stage)
            self.upsample = Upsampler(lowres[0], s.dim, lowres[1], config.norm, embed_dim)
        block = TransformerBlock if s.block == "transformer" else ConvNeXtBlock
        self.blocks = nn.ModuleList([block(s, config.norm, embed_dim) for _ in range(s.depth)])
        self.skips = nn.ModuleList([_linear(2 * s.dim, s.dim) for _ in range(s.depth // 2)])
        self.out_norm = make_norm(config.norm, s.dim, "ln", embed_dim)
        self.out_conv = nn.Conv2d(s.dim, config.in_channels, s.output_kernel, padding=s.output_kernel // 2)

    @property
    def feature_dim(self) -> int:
        return (self.s.depth + 1) * self.s.dim

    def _block(self, block: nn.Module, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, cond, use_reentrant=False)
        return block(x, cond)

    def forward(self, images, cond, lowres=None, class_labels=None):
        s = self.s
        x = images
        if s.input_downsample > 1:
            x = F.interpolate(x, size=(x.shape[-2] // s.input_downsample, x.shape[-1] // s.input_downsample),
                              mode="area")
        x = self.patch(x).permute(0, 2, 3, 1) + self.position  # (B, h, w, d)
        if lowres is not None:
            x = x + self.upsample(lowres, cond)
        B, h, w, d = x.shape
        if s.block == "transformer":
            x = x.reshape(B, h * w, d)  # (B, N, d)
            if self.class_embed is not None:
                x = torch.cat([self.class_embed(class_labels)[:, None], x], dim=1)  # (B, 1 + N, d)
        features, skips = [x], []
        half = s.depth // 2
        for block in self.blocks[:half]:
            x = self._block(block, x, cond)
            features.append(x)
            skips.append(x)
        x = self._block(self.blocks[half], x, cond)
        features.append(x)
        for dense, block in zip(self.skips, self.blocks[half + 1:]):
            x = dense(torch.cat([x, skips.pop()], dim=-1))  # U-ViT long skip
            x = self._block(block, x, cond)
            features.append(x)
        if s.block == "transformer":
            drop = 1 if self.class_embed is not None else 0
            x = x[:, drop:].reshape(B, h, w, d)
            features = [f[:, drop:].reshape(B, h, w, d) for f in features]
        eps = self.out_conv(self.out_norm(x, cond).permute(0, 3, 1, 2))  # (B, C, h, w)
        return eps, torch.cat(features, dim=-1)


class DiMRNet(nn.Module):
    """net(x (B, C, H, W), noise_labels (B,) zero-based timesteps, class_labels (B,) | None)
    -> [ε̂ per stage, low to high resolution]; the last is (B, C, H, W)."""

    def __init__(self, config: DiMRNetConfig):
        super().__init__()
        height, width = config.canvas
        if height <= 0 or width <= 0:
            raise ValueError("DiMRNetConfig.canvas must be set to the input (H, W) the net is built for")
        check_dimr_config(config, height, width)
        self.config = config
        embed_dim = 0
        self.time_embed = None
        if config.norm == "adaln":
            embed_dim = config.adaln_embed_dim or config.stages[0].dim
            self.time_embed = TimeEmbedding(embed_dim)
        sizes = stage_resolutions(config, height, width)
        stages, lowres = [], None
        for k, s in enumerate(config.stages):
            stage = Stage(s, config, sizes[k], lowres, embed_dim)
            stages.append(stage)
            if k + 1 < len(config.stages):
                lowres = (stage.feature_dim, s.factor // config.stages[k + 1].factor)
        self.stages = nn.ModuleList(stages)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None):
        cfg = self.config
        noise_labels = noise_labels.reshape(-1).expand(x.shape[0]) if noise_labels.numel() == 1 else noise_labels
        if cfg.norm == "td":
            cond = shared_time(time_coordinate(noise_labels, cfg.num_timesteps))  # τ (B,), or (1,) if shared
        else:
            cond = self.time_embed(noise_labels)  # (B, E)
        if cfg.num_classes > 0 and class_labels is None:
            class_labels = torch.full((x.shape[0],), cfg.num_classes, dtype=torch.long, device=x.device)
        outputs, features = [], None
        for stage in self.stages:
            eps, features = stage(x, cond, features, class_labels)
            outputs.append(eps)
            if cfg.block_grad_to_lowres:
                features = features.detach()
        return outputs


# ------------------------------------------------------------------------------------------------
# Size and cost, without allocating anything (meta device).


def complexity(config: DiMRNetConfig, height: int | None = None, width: int | None = None) -> dict:
    """Parameters and forward GFLOPs of one example, counted on the meta device.

    GFLOPs follow DiT/DiMR's convention, one multiply-add = one FLOP: torch's FlopCounterMode counts
    two per multiply-add (matmuls, convolutions, attention), so its total is halved. Norms, GELU and
    softmax are not counted (neither are they in the papers' tables)."""
    from torch.utils.flop_counter import FlopCounterMode

    height = height or config.canvas[0]
    width = width or config.canvas[1]
    config = dataclasses.replace(config, canvas=(height, width))
    with torch.device("meta"):
        net = DiMRNet(config)
        x = torch.zeros(1, config.in_channels, height, width)
        t = torch.zeros(1)
        labels = torch.zeros(1, dtype=torch.long) if config.num_classes else None
    params = sum(p.numel() for p in net.parameters())
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x, t, labels)
    return dict(params=params, gflops=counter.get_total_flops() / 2 / 1e9)

"""The DDPM U-Net of lucidrains/denoising-diffusion-pytorch (v0.x), as Patch-based DDPM uses it.

Arakawa et al. 2023 (CVPRW, "Memory Efficient Diffusion Probabilistic Models via Patch-based
Generation") run this network on one patch at a time; METHODS.md §2 lists its layers:

    init conv 7×7 (in → init_dim = dim//3·2)
    encoder, per level i (width dim·dim_mults[i]):  ResnetBlock, ResnetBlock, Residual(PreNorm(LinearAttention)),
                                                     Downsample (conv 4×4 stride 2; not after the last level)
    middle:   ResnetBlock, Residual(PreNorm(Attention)), ResnetBlock
    decoder, per level except the first (deepest first): concat skip, ResnetBlock, ResnetBlock,
              Residual(PreNorm(LinearAttention)), Upsample (transposed conv 4×4 stride 2)
    head:     ResnetBlock(dim, dim) without the embedding, conv 1×1 → out_dim

The decoder uses the skips of levels L..2 only; level 1's skip is computed and never used (a quirk
of that code version, kept). Conditioning (the paper's §3.2): the timestep's sinusoidal embedding
→ Linear → GELU, the patch position's one-hot → Linear → GELU, the two concatenated → Linear to
4·dim; every ResnetBlock turns that vector into a scale and shift (h·(1 + scale) + shift after its
first GroupNorm). The Global Content Conditioning channels are concatenated to the patch before
the first conv. Without positions (`num_positions = 0`, the ablation) the time part alone feeds
the last Linear.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from patchdiffusion.config import Range


@dataclass
class DDPMUNetConfig:
    dim: int = 32                        # base width (the reference template uses 128)
    dim_mults: tuple[int, ...] = (1, 2, 4)  # width multiplier per level (reference: 1, 2, 4, 8)
    init_dim: int | None = None          # width of the 7×7 input conv; None -> dim // 3 * 2 (as the reference)
    channels: int = 3                    # image channels of a patch
    out_dim: int | None = None           # predicted channels; None -> channels (ε)
    resnet_block_groups: int = 8         # GroupNorm groups inside ResnetBlocks
    attn_heads: int = 4                  # heads of the linear and the full attention
    attn_dim_head: int = 32              # channels per head

    RANGES: ClassVar[dict] = {
        "dim": Range(1, 1 << 16), "dim_mults": Range(1, 1 << 10), "init_dim": Range(1, 1 << 16), "channels": Range(1, 1 << 16), "out_dim": Range(1, 1 << 16),
        "resnet_block_groups": Range(1, 1 << 10), "attn_heads": Range(1, 1 << 10), "attn_dim_head": Range(1, 1 << 16),
    }

    def __post_init__(self) -> None:
        self.dim_mults = tuple(int(m) for m in self.dim_mults)  # YAML gives lists
        if not self.dim_mults:
            raise ValueError("dim_mults needs at least one level")
        if self.dim_mults[0] != 1:
            # The head's ResnetBlock(dim, dim) reads the first decoder level, which is dim·dim_mults[0] wide.
            raise ValueError(f"dim_mults must start with 1 (the output block is dim wide), got {self.dim_mults}")

    @property
    def size_divisor(self) -> int:
        """A patch side must be a multiple of this: one factor 2 per downsampling."""
        return 2 ** (len(self.dim_mults) - 1)


# ------------------------------------------------------------------------------------------------
# Embeddings


def sinusoidal_embedding(time: torch.Tensor, dim: int) -> torch.Tensor:
    """lucidrains' SinusoidalPosEmb (Vaswani et al. 2017 §3.5 applied to t): [sin | cos] of
    t·exp(−ln(10⁴)·k/(dim/2 − 1)), k = 0 .. dim/2 − 1. time (N,) float -> (N, dim)."""
    half = dim // 2
    scale = math.log(10000) / max(half - 1, 1)
    freqs = torch.exp(torch.arange(half, device=time.device, dtype=torch.float32) * -scale)  # (half,)
    args = time.float()[:, None] * freqs[None, :]  # (N, half)
    emb = torch.cat([args.sin(), args.cos()], dim=-1)  # (N, 2·half)
    return F.pad(emb, (0, dim - 2 * half))  # (N, dim)


class ConditionEmbedding(nn.Module):
    """Time and position fused into one vector (Arakawa et al. 2023 §3.2, "position-wise conditioning"):
    time: sinusoidal(dim) → Linear(dim, dim) → GELU; position: Linear(P, dim) → GELU;
    then Linear(2·dim, 4·dim) on the concatenation (Linear(dim, 4·dim) when there are no positions)."""

    def __init__(self, dim: int, num_positions: int):
        super().__init__()
        self.dim, self.num_positions = dim, num_positions
        self.time_mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU())
        self.position_mlp = nn.Sequential(nn.Linear(num_positions, dim), nn.GELU()) if num_positions else None
        self.fuse = nn.Linear(dim * (2 if num_positions else 1), 4 * dim)

    @property
    def out_dim(self) -> int:
        return 4 * self.dim

    def forward(self, time: torch.Tensor, position: torch.Tensor | None) -> torch.Tensor:
        parts = [self.time_mlp(sinusoidal_embedding(time, self.dim))]  # (N, dim)
        if self.position_mlp is not None:
            if position is None or position.shape[-1] != self.num_positions:
                got = None if position is None else tuple(position.shape)
                raise ValueError(f"the network expects a one-hot position over {self.num_positions} cells, got {got}")
            parts.append(self.position_mlp(position.to(parts[0].dtype)))  # (N, dim)
        return self.fuse(torch.cat(parts, dim=-1))  # (N, 4·dim)


# ------------------------------------------------------------------------------------------------
# Blocks


class Block(nn.Module):
    """conv 3×3 → GroupNorm → optional h·(1 + scale) + shift → SiLU."""

    def __init__(self, dim: int, dim_out: int, groups: int):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim_out, 3, padding=1)
        self.norm = nn.GroupNorm(groups, dim_out)
        self.act = nn.SiLU()

    def forward(self, x, scale_shift=None):
        x = self.norm(self.proj(x))
        if scale_shift is not None:
            scale, shift = scale_shift
            x = x * (scale + 1) + shift
        return self.act(x)


class ResnetBlock(nn.Module):
    """Two Blocks and a residual (1×1 conv when the width changes); the embedding sets the first
    Block's scale and shift through SiLU → Linear(emb_dim, 2·dim_out)."""

    def __init__(self, dim: int, dim_out: int, emb_dim: int | None, groups: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, dim_out * 2)) if emb_dim else None
        self.block1 = Block(dim, dim_out, groups)
        self.block2 = Block(dim_out, dim_out, groups)
        self.res_conv = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x, emb=None):
        scale_shift = None
        if self.mlp is not None and emb is not None:
            scale_shift = self.mlp(emb)[:, :, None, None].chunk(2, dim=1)  # 2 × (N, dim_out, 1, 1)
        h = self.block2(self.block1(x, scale_shift))
        return h + self.res_conv(x)


class LinearAttention(nn.Module):
    """Linear attention (Katharopoulos et al. 2020; Shen et al. 2021's softmax form): q softmaxed
    over channels, k over positions, context = k vᵀ; cost linear in the number of pixels."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads, self.scale = heads, dim_head**-0.5
        hidden = heads * dim_head
        self.to_qkv = nn.Conv2d(dim, hidden * 3, 1, bias=False)
        self.to_out = nn.Sequential(nn.Conv2d(hidden, dim, 1), nn.GroupNorm(1, dim))

    def forward(self, x):
        n, _, h, w = x.shape
        q, k, v = (t.reshape(n, self.heads, -1, h * w) for t in self.to_qkv(x).chunk(3, dim=1))  # (N, heads, d, hw)
        q = q.softmax(dim=-2) * self.scale
        k = k.softmax(dim=-1)
        context = torch.einsum("bhdn,bhen->bhde", k, v)  # (N, heads, d, d)
        out = torch.einsum("bhde,bhdn->bhen", context, q)  # (N, heads, d, hw)
        return self.to_out(out.reshape(n, -1, h, w))


class Attention(nn.Module):
    """Full softmax self-attention over all pixels (Vaswani et al. 2017), used in the middle."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads, self.scale = heads, dim_head**-0.5
        hidden = heads * dim_head
        self.to_qkv = nn.Conv2d(dim, hidden * 3, 1, bias=False)
        self.to_out = nn.Conv2d(hidden, dim, 1)

    def forward(self, x):
        n, _, h, w = x.shape
        q, k, v = (t.reshape(n, self.heads, -1, h * w) for t in self.to_qkv(x).chunk(3, dim=1))  # (N, heads, d, hw)
        sim = torch.einsum("bhdi,bhdj->bhij", q * self.scale, k)  # (N, heads, hw, hw)
        attn = sim.softmax(dim=-1)
        out = torch.einsum("bhij,bhdj->bhid", attn, v)  # (N, heads, hw, d)
        return self.to_out(out.permute(0, 1, 3, 2).reshape(n, -1, h, w))


class PreNormResidual(nn.Module):
    """x + fn(GroupNorm(1, dim)(x)): lucidrains' Residual(PreNorm(dim, fn))."""

    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.norm = nn.GroupNorm(1, dim)
        self.fn = fn

    def forward(self, x):
        return x + self.fn(self.norm(x))


# ------------------------------------------------------------------------------------------------
# The network


class DDPMUNet(nn.Module):
    """ε-prediction U-Net over patches: forward(x, time, position, global_content) -> (N, out_dim, p, p).

    `extra_channels` input channels (the GCC's pooled image) are concatenated after the patch's own
    `channels`; `num_positions` is D² (0 = no position conditioning).
    """

    def __init__(self, config: DDPMUNetConfig, extra_channels: int = 0, num_positions: int = 0):
        super().__init__()
        self.config = cfg = config
        self.extra_channels, self.num_positions = extra_channels, num_positions
        groups, heads, dim_head = cfg.resnet_block_groups, cfg.attn_heads, cfg.attn_dim_head
        init_dim = cfg.init_dim or cfg.dim // 3 * 2
        self.init_conv = nn.Conv2d(cfg.channels + extra_channels, init_dim, 7, padding=3)
        self.embed = ConditionEmbedding(cfg.dim, num_positions)
        emb = self.embed.out_dim

        dims = [init_dim, *(cfg.dim * m for m in cfg.dim_mults)]
        in_out = list(zip(dims[:-1], dims[1:]))
        levels = len(in_out)
        self.downs = nn.ModuleList()
        for i, (dim_in, dim_out) in enumerate(in_out):
            last = i == levels - 1
            self.downs.append(nn.ModuleList([
                ResnetBlock(dim_in, dim_out, emb, groups),
                ResnetBlock(dim_out, dim_out, emb, groups),
                PreNormResidual(dim_out, LinearAttention(dim_out, heads, dim_head)),
                nn.Conv2d(dim_out, dim_out, 4, 2, 1) if not last else nn.Identity(),
            ]))
        mid = dims[-1]
        self.mid_block1 = ResnetBlock(mid, mid, emb, groups)
        self.mid_attn = PreNormResidual(mid, Attention(mid, heads, dim_head))
        self.mid_block2 = ResnetBlock(mid, mid, emb, groups)
        self.ups = nn.ModuleList()
        for dim_in, dim_out in reversed(in_out[1:]):
            self.ups.append(nn.ModuleList([
                ResnetBlock(dim_out * 2, dim_in, emb, groups),
                ResnetBlock(dim_in, dim_in, emb, groups),
                PreNormResidual(dim_in, LinearAttention(dim_in, heads, dim_head)),
                nn.ConvTranspose2d(dim_in, dim_in, 4, 2, 1),
            ]))
        self.final_block = ResnetBlock(cfg.dim, cfg.dim, None, groups)
        self.final_conv = nn.Conv2d(cfg.dim, cfg.out_dim or cfg.channels, 1)

    def forward(
        self,
        x: torch.Tensor,
        time: torch.Tensor,
        position: torch.Tensor | None = None,
        global_content: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (N, C, p, p) patches, time (N,) timesteps, position (N, D²) one-hot, global_content
        (N, extra, p, p) -> ε̂ (N, out_dim, p, p)."""
        if self.extra_channels:
            if global_content is None or global_content.shape[1] != self.extra_channels:
                raise ValueError(f"the network expects {self.extra_channels} global-content channels")
            x = torch.cat([x, global_content.to(x.dtype)], dim=1)  # (N, C + extra, p, p)
        emb = self.embed(time, position)  # (N, 4·dim)
        h = self.init_conv(x)
        skips = []
        for block1, block2, attn, down in self.downs:
            h = attn(block2(block1(h, emb), emb))
            skips.append(h)
            h = down(h)
        h = self.mid_block2(self.mid_attn(self.mid_block1(h, emb)), emb)
        for block1, block2, attn, up in self.ups:
            h = torch.cat([h, skips.pop()], dim=1)  # the deepest unused skip first; level 1's stays unused
            h = up(attn(block2(block1(h, emb), emb)))
        return self.final_conv(self.final_block(h))

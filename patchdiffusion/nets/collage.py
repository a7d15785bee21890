"""Patch-DM's collage U-Net (Ding et al., ICLR 2024, §3.2 "feature collage", Fig. 3).

The network only ever sees patches of side p. Its encoder (input blocks + middle block) runs on
every patch on its own, conditioned on the time step, the patch's position in the grid and a
global semantic code. At the start of the decoder the features of neighbouring patches are put back
side by side, the grid is shifted by half a patch and cut again ("collage"), and every skip
connection gets the same treatment at its own resolution, so each decoded patch is made of one
quadrant of four neighbouring encoder patches and no output patch comes from one input patch alone:

    patches (N·rows·cols, C, p, p) --encoder--> bottleneck + skips, per patch
      --collage--> (N·(rows−1)·(cols−1), ·, ·, ·)  [grid of each image reassembled, h/2 cropped on
                                                    every border, cut into h×w windows again]
      --decoder (on the shifted windows, positions k + 0.5)--> (N·(rows−1)·(cols−1), C, p, p)

Conditioning (DiffAE's "two-cond" ResBlock, which the reference builds on):
  * emb = [time MLP(sin(t)) | position MLP([sin(x) | sin(y)])] enters every ResBlock as AdaGN
    scale/shift: h = GN(h)·(1 + s) + b;
  * the semantic code scales the result: h = h·(1 + W·SiLU(code)) (scale only, no attention).
Classifier-free guidance drops the position (its embedding is multiplied by 0) and the code (set to 0).

The net knows nothing of σ or of how canvases are tiled; `methods/patch_dm.py` does that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from patchdiffusion.config import Range

from .layers import AttentionBlock, Downsample, Upsample, conv3x3, normalization, timestep_embedding, zero_module


@dataclass
class CollageUNetConfig:
    in_channels: int = 3  # image channels
    out_channels: int = 3  # predicted channels (ε)
    patch_size: int = 64  # p: side of every patch the net sees (the paper's default)
    model_channels: int = 64  # base width; also the sinusoid width of t and of each position axis
    channel_mult: tuple[int, ...] = (1, 2, 4, 8)  # width multiplier per level (the paper's p = 64 net)
    num_res_blocks: int = 2  # ResBlocks per encoder level (the decoder has one more)
    attention_resolutions: tuple[int, ...] = (16,)  # feature sides inside a patch that get self-attention
    head_channels: int = 0  # channels per attention head; 0 = one head (the paper)
    dropout: float = 0.0  # dropout inside ResBlocks
    code_dim: int = 512  # width of the semantic code (CLIP ViT-B/16 image embedding: 512); 0 = no code
    num_codes: int = 0  # rows of the code table (one per training image); 0 = no table (codes passed in)

    RANGES: ClassVar[dict] = {
        "in_channels": Range(1, 1 << 16), "out_channels": Range(1, 1 << 16), "patch_size": Range(2, 1 << 12), "model_channels": Range(1, 1 << 16),
        "channel_mult": Range(1, 1 << 10), "num_res_blocks": Range(0, 64), "attention_resolutions": Range(1, 1 << 12),
        "head_channels": Range(0, 1 << 16), "dropout": Range(0, 1), "code_dim": Range(0, 1 << 16),
        "num_codes": Range(0, 1 << 31),
    }

    def __post_init__(self) -> None:
        self.channel_mult = tuple(int(m) for m in self.channel_mult)  # YAML gives lists
        self.attention_resolutions = tuple(self.attention_resolutions)

    @property
    def emb_dim(self) -> int:
        """Width of [time | position]: 4·mc each (the reference: 256 + 256 at mc = 64)."""
        return 8 * self.model_channels

    @property
    def bottleneck_side(self) -> int:
        return self.patch_size // 2 ** (len(self.channel_mult) - 1)


class Encoded(NamedTuple):
    """What the encoder hands the decoder, per patch: the bottleneck and the skips (shallow first)."""

    h: torch.Tensor  # (N, C_L, h_L, w_L)
    skips: list[torch.Tensor]  # [(N, C_l, h_l, w_l), ...]


# ------------------------------------------------------------------------------------------------
# The collage (reference: crop half a patch from every border of the reassembled grid, cut again).


def collage(features: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Shift a grid of patch features by half a patch: (N·rows·cols, C, h, w) -> (N·(rows−1)·(cols−1), C, h, w).

    Patches of an image are in row-major order. Output window (i, j) is made of the bottom-right
    quadrant of patch (i, j), bottom-left of (i, j+1), top-right of (i+1, j), top-left of (i+1, j+1).
    """
    n_all, C, h, w = features.shape
    if h % 2 or w % 2:
        raise ValueError(f"collage needs even feature sides to shift by half, got {h}x{w}")
    N = n_all // (rows * cols)
    grid = features.reshape(N, rows, cols, C, h, w).permute(0, 3, 1, 4, 2, 5).reshape(N, C, rows * h, cols * w)
    shifted = grid[:, :, h // 2: rows * h - h // 2, w // 2: cols * w - w // 2]  # (N, C, (rows−1)h, (cols−1)w)
    return cut_grid(shifted, rows - 1, cols - 1)


def cut_grid(canvas: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(N, C, rows·h, cols·w) -> (N·rows·cols, C, h, w), patches in row-major order."""
    N, C, H, W = canvas.shape
    h, w = H // rows, W // cols
    return canvas.reshape(N, C, rows, h, cols, w).permute(0, 2, 4, 1, 3, 5).reshape(N * rows * cols, C, h, w)


def join_grid(patches: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The inverse of `cut_grid`: (N·rows·cols, C, h, w) -> (N, C, rows·h, cols·w)."""
    n_all, C, h, w = patches.shape
    N = n_all // (rows * cols)
    return patches.reshape(N, rows, cols, C, h, w).permute(0, 3, 1, 4, 2, 5).reshape(N, C, rows * h, cols * w)


def window_values(per_patch: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A per-patch value (N·rows·cols, ...) for each collaged window: that of its top-left patch."""
    shaped = per_patch.reshape(-1, rows, cols, *per_patch.shape[1:])
    return shaped[:, : rows - 1, : cols - 1].reshape(-1, *per_patch.shape[1:])


# ------------------------------------------------------------------------------------------------
# Blocks


class CodeResBlock(nn.Module):
    """DiffAE's two-cond ResBlock: AdaGN from [time | position], then a scale from the semantic code.

    h = conv(SiLU(GN(x)))                     (resampled between SiLU and conv when up/down)
    h = GN(h)·(1 + s) + b                     (s, b = Linear(SiLU(emb)))
    h = h·(1 + Linear(SiLU(code)))            (when the net has a code)
    return skip(x) + zero_conv(Dropout(SiLU(h)))
    """

    def __init__(self, channels: int, emb_dim: int, code_dim: int, out_channels: int | None = None,
                 dropout: float = 0.0):
        super().__init__()
        out_channels = out_channels or channels
        self.in_norm = normalization(channels)
        self.in_conv = conv3x3(channels, out_channels)
        self.emb_proj = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_channels))
        self.code_proj = nn.Sequential(nn.SiLU(), nn.Linear(code_dim, out_channels)) if code_dim > 0 else None
        self.out_norm = normalization(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = zero_module(conv3x3(out_channels, out_channels))
        self.skip = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, code: torch.Tensor | None) -> torch.Tensor:
        h = self.in_conv(F.silu(self.in_norm(x)))  # (N, C_out, h, w)
        scale, shift = self.emb_proj(emb).type(h.dtype)[:, :, None, None].chunk(2, dim=1)  # (N, C_out, 1, 1) each
        h = self.out_norm(h) * (1 + scale) + shift
        if self.code_proj is not None:
            h = h * (1 + self.code_proj(code).type(h.dtype)[:, :, None, None])
        h = self.out_conv(self.dropout(F.silu(h)))
        return self.skip(x) + h  # (N, C_out, h, w)


class CondSequential(nn.Sequential):
    """Layers of which the ResBlocks also receive (emb, code)."""

    def forward(self, h: torch.Tensor, emb: torch.Tensor, code: torch.Tensor | None) -> torch.Tensor:
        for layer in self:
            h = layer(h, emb, code) if isinstance(layer, CodeResBlock) else layer(h)
        return h


# ------------------------------------------------------------------------------------------------
# The network


class CollageUNet(nn.Module):
    def __init__(self, config: CollageUNetConfig):
        super().__init__()
        self.config = cfg = config
        mc, D, K = cfg.model_channels, cfg.emb_dim, cfg.code_dim
        if cfg.patch_size % 2 ** len(cfg.channel_mult) or cfg.bottleneck_side < 2:
            raise ValueError(
                f"patch_size {cfg.patch_size} must be divisible by 2^{len(cfg.channel_mult)} so that the "
                "bottleneck side is even (the collage shifts every level by half)"
            )

        def width(mult: int) -> int:
            return mult * mc

        def attention(ch: int) -> AttentionBlock:
            return AttentionBlock(ch, cfg.head_channels or ch)

        def block(ch_in: int, ch_out: int) -> CodeResBlock:
            return CodeResBlock(ch_in, D, K, ch_out, cfg.dropout)

        # Time and position MLPs (the reference's TimeStyleSeperateEmbed): 4·mc each, concatenated.
        self.time_embed = nn.Sequential(nn.Linear(mc, 4 * mc), nn.SiLU(), nn.Linear(4 * mc, 4 * mc))
        self.position_embed = nn.Sequential(nn.Linear(2 * mc, 4 * mc), nn.SiLU(), nn.Linear(4 * mc, 4 * mc))
        # One learnable code per training image (initialised from CLIP by the method, or N(0, 1)).
        self.codes = nn.Embedding(cfg.num_codes, K) if cfg.num_codes > 0 and K > 0 else None

        self.input_conv = conv3x3(cfg.in_channels, width(cfg.channel_mult[0]))
        self.encoder = nn.ModuleList()
        skip_channels = [width(cfg.channel_mult[0])]
        ch, side = skip_channels[0], cfg.patch_size
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [block(ch, width(mult))]
                ch = width(mult)
                if side in cfg.attention_resolutions:
                    layers.append(attention(ch))
                self.encoder.append(CondSequential(*layers))
                skip_channels.append(ch)
            if level < len(cfg.channel_mult) - 1:
                self.encoder.append(CondSequential(Downsample(ch)))
                skip_channels.append(ch)
                side //= 2
        self.middle = CondSequential(block(ch, ch), attention(ch), block(ch, ch))

        self.decoder = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [block(ch + skip_channels.pop(), width(mult))]
                ch = width(mult)
                if side in cfg.attention_resolutions:
                    layers.append(attention(ch))
                if level > 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    side *= 2
                self.decoder.append(CondSequential(*layers))
        self.out = nn.Sequential(normalization(ch), nn.SiLU(), zero_module(conv3x3(ch, cfg.out_channels)))

    # -- conditioning -----------------------------------------------------------------------------
    def embed(self, t: torch.Tensor, positions: torch.Tensor, position_keep: torch.Tensor | None) -> torch.Tensor:
        """[time | position] embedding (N, 8·mc). t: (N,) timesteps; positions: (N, 2) grid (x, y)
        coordinates; position_keep: (N,) 1 to use the position, 0 for the guidance null (zero embedding)."""
        mc = self.config.model_channels
        e_t = self.time_embed(timestep_embedding(t, mc))  # (N, 4mc)
        sin_xy = torch.cat([timestep_embedding(positions[:, 0], mc), timestep_embedding(positions[:, 1], mc)], 1)
        e_p = self.position_embed(sin_xy)  # (N, 4mc)
        if position_keep is not None:
            e_p = e_p * position_keep.to(e_p.dtype)[:, None]
        return torch.cat([e_t, e_p], dim=1)  # (N, 8mc)

    def lookup_codes(self, index: torch.Tensor) -> torch.Tensor:
        if self.codes is None:
            raise ValueError("this CollageUNet has no code table (num_codes = 0); pass codes instead")
        return self.codes(index.long())  # (N, K)

    # -- the two halves ---------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, emb: torch.Tensor, code: torch.Tensor | None) -> Encoded:
        """Encoder and middle block, each patch on its own: x (N, C, p, p)."""
        h = self.input_conv(x)  # (N, ch0, p, p)
        skips = [h]
        for layer in self.encoder:
            h = layer(h, emb, code)  # (N, C_l, p/2^l, p/2^l)
            skips.append(h)
        return Encoded(self.middle(h, emb, code), skips)

    def decode(self, encoded: Encoded, emb: torch.Tensor, code: torch.Tensor | None) -> torch.Tensor:
        """Decoder on (possibly collaged) encoder outputs: -> (N', C_out, p, p)."""
        h, skips = encoded.h, list(encoded.skips)
        for layer in self.decoder:
            h = layer(torch.cat([h, skips.pop()], dim=1), emb, code)
        return self.out(h)

    @staticmethod
    def collage_encoded(encoded: Encoded, rows: int, cols: int) -> Encoded:
        """The collage of the bottleneck and of every skip, each at its own resolution."""
        return Encoded(collage(encoded.h, rows, cols), [collage(s, rows, cols) for s in encoded.skips])

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        positions: torch.Tensor,
        grid: tuple[int, int],
        *,
        code: torch.Tensor | None = None,
        code_index: torch.Tensor | None = None,
        position_keep: torch.Tensor | None = None,
        code_keep: torch.Tensor | None = None,
        mode: str = "collage",
    ):
        """Predict ε for patches x (N·rows·cols, C, p, p) of N images, each a rows×cols grid in row-major order.

        t (N·rows·cols,), positions (N·rows·cols, 2): per patch. code (…, K) or code_index (…,) per patch;
        code_keep (…,) zeroes the code where 0 (guidance null). mode:
          "collage": ε of the (rows−1)×(cols−1) shifted windows, decoder positions = encoder's + 0.5;
          "plain":   ε of the patches themselves (no collage; what `collage: false` trains);
          "both":    (collage, plain) from one encoder pass (training).
        """
        rows, cols = grid
        if code is None and code_index is not None:
            code = self.lookup_codes(code_index)
        if self.config.code_dim > 0:
            if code is None:
                raise ValueError(f"this CollageUNet needs a semantic code of width {self.config.code_dim}")
            if code_keep is not None:
                code = code * code_keep.to(code.dtype)[:, None]
        else:
            code = None
        emb = self.embed(t, positions, position_keep)  # (N·rows·cols, D)
        encoded = self.encode(x, emb, code)
        outputs = {}
        if mode in ("collage", "both"):
            def windows(v):
                return None if v is None else window_values(v, rows, cols)

            emb_w = self.embed(windows(t), windows(positions) + 0.5, windows(position_keep))
            outputs["collage"] = self.decode(self.collage_encoded(encoded, rows, cols), emb_w, windows(code))
        if mode in ("plain", "both"):
            outputs["plain"] = self.decode(encoded, emb, code)
        if not outputs:
            raise ValueError(f"mode must be 'collage', 'plain' or 'both', got {mode!r}")
        return (outputs["collage"], outputs["plain"]) if mode == "both" else outputs[mode]

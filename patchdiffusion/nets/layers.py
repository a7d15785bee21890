"""Building blocks for the U-Net: embeddings, normalisation, resampling, residual and attention blocks.

Everything here is shape-generic over the spatial size; nothing knows about sigma or patching policy.
Shapes use B = batch, C = channels, H, W = the feature map's own height and width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# ------------------------------------------------------------------------------------------------
# Embeddings


def timestep_embedding(noise_labels: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of a float per example (ADM form: [cos | sin] halves).

    noise_labels: (B,) floats (EDM's c_noise or a DDPM timestep). Returns (B, dim).
    Frequencies are exp(-ln(max_period) * k / half) for k = 0 .. half-1; an odd dim is zero-padded.
    """
    half = dim // 2
    k = torch.arange(half, dtype=torch.float32, device=noise_labels.device)
    freqs = torch.exp(-math.log(max_period) * k / half)  # (half,)
    args = noise_labels.float()[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)  # (B, 2*half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))  # (B, dim)
    return emb


def sinusoidal_position_map(channels: int, height: int, width: int, omega: float = 1.0) -> torch.Tensor:
    """Luhman & Luhman's fixed 2-D position map, added to the features after the first conv.

    The first half of the channels encodes the column index x, the second half the row index y.
    Sin only (no cos), frequencies exp(-ln(10000) * k / (half - 1)), positions scaled by omega
    (= 64 / patched resolution, so larger maps get longer wavelengths). Value at position 0 is 0.
    Returns (1, channels, height, width); channels must be even.
    """
    if channels % 2:
        raise ValueError(f"sinusoidal_position_map needs an even channel count, got {channels}.")
    half = channels // 2
    k = torch.arange(half, dtype=torch.float32)
    freqs = torch.exp(-math.log(10000.0) * k / max(half - 1, 1))  # (half,)
    xs = torch.arange(width, dtype=torch.float32) * omega  # (W,)
    ys = torch.arange(height, dtype=torch.float32) * omega  # (H,)
    col = torch.sin(freqs[:, None] * xs[None, :])  # (half, W): varies with the column only
    row = torch.sin(freqs[:, None] * ys[None, :])  # (half, H): varies with the row only
    col = col[:, None, :].expand(half, height, width)  # (half, H, W)
    row = row[:, :, None].expand(half, height, width)  # (half, H, W)
    return torch.cat([col, row], dim=0)[None]  # (1, C, H, W)


# ------------------------------------------------------------------------------------------------
# Patching: a pure reshape, no learned patch embedding (Luhman & Luhman 2022).


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """Space-to-depth: (B, C, H, W) -> (B, C*p*p, H/p, W/p).

    Output channel c*p*p + i*p + j holds input pixel (p*y + i, p*x + j) of channel c at output
    position (y, x) -- torch's pixel_unshuffle ordering (C, row offset, column offset). Luhman's
    reference flattens (row offset, column offset, C) instead; any fixed bijection is equivalent
    when training from scratch. H and W must be divisible by p.
    """
    if p == 1:
        return x
    return F.pixel_unshuffle(x, p)  # (B, C*p*p, H/p, W/p)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """Depth-to-space, the exact inverse of patchify: (B, C*p*p, h, w) -> (B, C, h*p, w*p)."""
    if p == 1:
        return x
    return F.pixel_shuffle(x, p)  # (B, C, h*p, w*p)


# ------------------------------------------------------------------------------------------------
# Small helpers


def num_groups(channels: int, max_groups: int = 32) -> int:
    """The largest group count <= max_groups that divides channels (32 for the usual widths)."""
    for g in range(min(max_groups, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 (stable under fp16/bf16), cast back to the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    """ADM's normalisation layer: GroupNorm with min(32, channels)-ish groups that divide channels."""
    return GroupNorm32(num_groups(channels), channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero all parameters of a module in place and return it (used on residual-branch outputs)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1)


# ------------------------------------------------------------------------------------------------
# Resampling


class Downsample(nn.Module):
    """Halve H and W with a strided 3x3 conv: (B, C, H, W) -> (B, C_out, H/2, W/2)."""

    def __init__(self, channels: int, out_channels: int | None = None):
        super().__init__()
        self.conv = conv3x3(channels, out_channels or channels, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double H and W: nearest neighbour then a 3x3 conv. (B, C, H, W) -> (B, C_out, 2H, 2W)."""

    def __init__(self, channels: int, out_channels: int | None = None):
        super().__init__()
        self.conv = conv3x3(channels, out_channels or channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")  # (B, C, 2H, 2W)
        return self.conv(x)


# ------------------------------------------------------------------------------------------------
# Residual block


class ResBlock(nn.Module):
    """ADM residual block conditioned on an embedding, with Luhman's optional class gate.

    h = conv(SiLU(GN(x)))                                  (resampled between SiLU and conv if up/down)
    h = GN(h) * (1 + scale) + shift  or  GN(h + shift)      (scale-shift norm, or plain addition)
    h = zero_conv(Dropout(SiLU(h)))
    h = h * sigmoid(W c + 2)                               (class gate, when class_dim > 0)
    return skip(x) + h                                     (skip = 1x1 conv when channels change)
    """

    def __init__(
        self,
        channels: int,
        emb_dim: int,
        out_channels: int | None = None,
        dropout: float = 0.0,
        use_scale_shift_norm: bool = True,
        up: bool = False,
        down: bool = False,
        class_dim: int = 0,
        emb_silu: bool = True,
    ):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_norm = normalization(channels)
        self.in_conv = conv3x3(channels, out_channels)
        if up:
            self.resample = nn.Upsample(scale_factor=2, mode="nearest")
        elif down:
            self.resample = nn.AvgPool2d(kernel_size=2)
        else:
            self.resample = nn.Identity()
        # The embedding projection. ADM applies SiLU first; Luhman's time embedding already ends in
        # SiLU, so there the projection is a bare Linear (emb_silu=False).
        emb_out = 2 * out_channels if use_scale_shift_norm else out_channels
        self.emb_proj = nn.Sequential(nn.SiLU() if emb_silu else nn.Identity(), nn.Linear(emb_dim, emb_out))
        self.out_norm = normalization(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = zero_module(conv3x3(out_channels, out_channels))
        self.gate = nn.Linear(class_dim, out_channels) if class_dim > 0 else None
        self.skip = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, class_emb: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, C, H, W); emb: (B, emb_dim); class_emb: (B, class_dim) when the gate is used.
        h = F.silu(self.in_norm(x))  # (B, C, H, W)
        h = self.resample(h)  # (B, C, H', W')
        x = self.resample(x)  # (B, C, H', W')
        h = self.in_conv(h)  # (B, C_out, H', W')

        e = self.emb_proj(emb).type(h.dtype)[:, :, None, None]  # (B, 2*C_out or C_out, 1, 1)
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)  # (B, C_out, 1, 1) each
            h = self.out_norm(h) * (1 + scale) + shift
        else:
            h = self.out_norm(h + e)
        h = self.out_conv(self.dropout(F.silu(h)))  # (B, C_out, H', W')

        if self.gate is not None:
            if class_emb is None:
                raise ValueError("This ResBlock has a class gate; pass class_emb.")
            g = torch.sigmoid(self.gate(class_emb) + 2.0).type(h.dtype)  # (B, C_out)
            h = h * g[:, :, None, None]
        return self.skip(x) + h  # (B, C_out, H', W')


# ------------------------------------------------------------------------------------------------
# Attention


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all H*W positions, pre-GroupNorm, zero-initialised output.

    QKV comes from one 1x1 projection and is split into q, k, v before the heads are split
    (ADM's "new attention order"). heads = channels / head_channels (one head if channels is smaller).
    """

    def __init__(self, channels: int, head_channels: int = 64):
        super().__init__()
        if channels <= head_channels:
            self.num_heads = 1
        elif channels % head_channels == 0:
            self.num_heads = channels // head_channels
        else:
            raise ValueError(f"AttentionBlock: {channels} channels are not divisible by head_channels={head_channels}.")
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        n = self.num_heads
        qkv = self.qkv(self.norm(x).reshape(B, C, H * W))  # (B, 3C, N)
        q, k, v = qkv.chunk(3, dim=1)  # (B, C, N) each

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(B, n, C // n, H * W).transpose(2, 3)  # (B, n, N, C/n)

        a = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))  # (B, n, N, C/n)
        a = a.transpose(2, 3).reshape(B, C, H * W)  # (B, C, N)
        return x + self.proj_out(a).reshape(B, C, H, W)  # (B, C, H, W)

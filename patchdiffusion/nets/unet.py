"""ADM-family U-Net with Luhman & Luhman (2022) input patching.

The image is cut into non-overlapping P x P patches by a pure reshape (space-to-depth), the whole
U-Net runs at H/P x W/P, and the output is put back with the inverse reshape. With P = 1 and the
Luhman options off this is the ADM U-Net (Dhariwal & Nichol 2021) with scale-shift norm.

    x (B, C, H, W) --patchify--> (B, C*P*P, H/P, W/P) --conv3x3--> (B, ch0, H/P, W/P) [+ position map]
      --> encoder (ResBlocks [+ attention], strided-conv downsampling), skips kept
      --> middle (ResBlock, attention, ResBlock)
      --> decoder (ResBlocks on [h, skip] [+ attention], nearest+conv upsampling)
      --> GN, SiLU, zero conv3x3 --> (B, C_out*P*P, H/P, W/P) --unpatchify--> (B, C_out, H, W)

Luhman's options: a fixed sin position map after the first conv, a time embedding of width
model_channels * channel_mult[-1] ending in SiLU, a multiplicative class gate in every ResBlock, and
a small learned-variance head on detached features (see METHODS.md section 3).

The network knows nothing of sigma: net(x, noise_labels, class_labels, embedding, extra_channels).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from patchdiffusion.config import Range

from .layers import (
    AttentionBlock,
    Downsample,
    ResBlock,
    Upsample,
    conv3x3,
    normalization,
    patchify,
    sinusoidal_position_map,
    timestep_embedding,
    unpatchify,
    zero_module,
)


@dataclass
class UNetConfig:
    in_channels: int = 3  # image channels of x
    out_channels: int = 3  # channels predicted per pixel (doubled in the output when learn_sigma)
    extra_in_channels: int = 0  # conditioning maps concatenated to x before patchify (e.g. 2 coordinate maps)
    model_channels: int = 64  # base width; level i has int(channel_mult[i] * model_channels) channels
    channel_mult: tuple[float, ...] = (1, 2, 2, 2)  # width multiplier per resolution level (len = levels)
    num_res_blocks: int = 2  # ResBlocks per level in the encoder (the decoder has one more)
    # Feature-map sides (in the patched space) that get self-attention. A level's side is
    # (resolution / patch_size) / 2**level, fixed when the net is built from the nominal `resolution`;
    # inputs of other sizes or aspect ratios run through the same levels. The middle block always attends.
    attention_resolutions: tuple[int, ...] = (16,)
    head_channels: int = 64  # channels per attention head
    dropout: float = 0.0  # dropout inside ResBlocks
    patch_size: int = 1  # Luhman's P: the U-Net runs at H/P x W/P on C*P*P channels (1 = no patching)
    num_classes: int = 0  # 0 = unconditional; else labels 0..num_classes-1, and num_classes = CFG null label
    embedding_dim: int = 0  # width of an extra conditioning vector (e.g. a global code); 0 = none
    use_scale_shift_norm: bool = True  # FiLM-style GN(h) * (1 + scale) + shift from the embedding
    resblock_updown: bool = False  # resample with ResBlocks (avg-pool / nearest) instead of conv layers
    position_map: bool = False  # Luhman: add a fixed 2-D sin position map after the first conv
    class_gate: bool = False  # Luhman: labels gate every residual branch (h * sigmoid(W c + 2)) instead of
    #                           being added to the time embedding; the label embedding is then ch0 wide
    time_embed_dim: int | None = None  # None: ADM, 4 * model_channels. Set (Luhman: model_channels *
    #                                   channel_mult[-1]): the time MLP ends in SiLU and blocks project it bare
    learn_sigma: bool = False  # Luhman variance head: output gets out_channels more channels, v in [0, 1]
    resolution: int = 64  # nominal image side in pixels: picks attention levels, and omega = 64 / (resolution / P)

    RANGES: ClassVar[dict] = {
        "in_channels": Range(1, 1 << 16), "out_channels": Range(1, 1 << 16), "extra_in_channels": Range(0, 1 << 16), "model_channels": Range(1, 1 << 16),
        "channel_mult": Range(0, 1 << 10, low_open=True), "num_res_blocks": Range(0, 64),
        "attention_resolutions": Range(1, 1 << 20), "head_channels": Range(1, 1 << 16), "dropout": Range(0, 1),
        "patch_size": Range(1, 1 << 10), "num_classes": Range(0, 1 << 24), "embedding_dim": Range(0, 1 << 16),
        "time_embed_dim": Range(1, 1 << 16), "resolution": Range(1, 1 << 20),
    }

    def __post_init__(self):
        self.channel_mult = tuple(self.channel_mult)  # YAML gives lists
        self.attention_resolutions = tuple(self.attention_resolutions)
        if self.patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {self.patch_size}.")
        if not self.channel_mult:
            raise ValueError("channel_mult needs at least one level.")
        if self.position_map and self.ch0 % 2:
            raise ValueError(f"position_map needs an even first-level width, got {self.ch0}.")

    @property
    def ch0(self) -> int:
        """Width of the first conv's output (and of the output head's input)."""
        return int(self.channel_mult[0] * self.model_channels)

    @property
    def emb_dim(self) -> int:
        """Width of the conditioning embedding handed to every ResBlock."""
        return self.time_embed_dim or 4 * self.model_channels

    @property
    def size_divisor(self) -> int:
        """H and W must be multiples of this: P times one factor 2 per downsampling."""
        return self.patch_size * 2 ** (len(self.channel_mult) - 1)


class EmbedSequential(nn.Sequential):
    """A sequence of layers where ResBlocks also receive the embeddings."""

    def forward(self, h: torch.Tensor, emb: torch.Tensor, class_emb: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self:
            h = layer(h, emb, class_emb) if isinstance(layer, ResBlock) else layer(h)
        return h


class UNet(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        mc, P, D = cfg.model_channels, cfg.patch_size, cfg.emb_dim
        ch0 = cfg.ch0
        luhman_emb = cfg.time_embed_dim is not None
        class_dim = ch0 if (cfg.class_gate and cfg.num_classes > 0) else 0

        def width(mult: float) -> int:
            return int(mult * mc)

        def attends(level: int) -> bool:
            side = cfg.resolution / P / 2**level  # nominal feature-map side at this level
            return side in cfg.attention_resolutions

        def res_block(ch_in: int, ch_out: int, **updown) -> ResBlock:
            return ResBlock(ch_in, D, ch_out, cfg.dropout, cfg.use_scale_shift_norm,
                            class_dim=class_dim, emb_silu=not luhman_emb, **updown)

        # Conditioning: time MLP (ADM: Linear, SiLU, Linear; Luhman adds a trailing SiLU).
        time_layers = [nn.Linear(mc, 4 * mc), nn.SiLU(), nn.Linear(4 * mc, D)]
        self.time_embed = nn.Sequential(*time_layers, *([nn.SiLU()] if luhman_emb else []))
        self.label_embed = None
        if cfg.num_classes > 0:  # last row = classifier-free-guidance null label
            self.label_embed = nn.Embedding(cfg.num_classes + 1, class_dim or D)
        self.embedding_proj = nn.Linear(cfg.embedding_dim, D) if cfg.embedding_dim > 0 else None

        # Input: patched image (and extra maps) -> ch0 features at H/P x W/P.
        self.input_conv = conv3x3((cfg.in_channels + cfg.extra_in_channels) * P * P, ch0)

        # Encoder.
        self.encoder = nn.ModuleList()
        skip_channels = [ch0]
        ch = ch0
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [res_block(ch, width(mult))]
                ch = width(mult)
                if attends(level):
                    layers.append(AttentionBlock(ch, cfg.head_channels))
                self.encoder.append(EmbedSequential(*layers))
                skip_channels.append(ch)
            if level < len(cfg.channel_mult) - 1:
                down = res_block(ch, ch, down=True) if cfg.resblock_updown else Downsample(ch)
                self.encoder.append(EmbedSequential(down))
                skip_channels.append(ch)

        # Middle.
        self.middle = EmbedSequential(res_block(ch, ch), AttentionBlock(ch, cfg.head_channels), res_block(ch, ch))

        # Decoder: each block eats one skip; the last block of a level (but the first) upsamples.
        self.decoder = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res_block(ch + skip_channels.pop(), width(mult))]
                ch = width(mult)
                if attends(level):
                    layers.append(AttentionBlock(ch, cfg.head_channels))
                if level > 0 and i == cfg.num_res_blocks:
                    layers.append(res_block(ch, ch, up=True) if cfg.resblock_updown else Upsample(ch))
                self.decoder.append(EmbedSequential(*layers))

        # Output head (mean): GN, SiLU, zero conv -> C_out * P * P channels.
        self.out = nn.Sequential(normalization(ch), nn.SiLU(), zero_module(conv3x3(ch, cfg.out_channels * P * P)))

        # Luhman's variance head on [first-conv features, last decoder features], detached.
        if cfg.learn_sigma:
            self.var_emb = nn.Conv2d(D, 2 * ch0, 1)
            self.var_head = nn.Sequential(
                conv3x3(2 * ch0, ch0), nn.SiLU(), conv3x3(ch0, cfg.out_channels * P * P), nn.Sigmoid()
            )
        self._pos_cache: dict[tuple, torch.Tensor] = {}

    def position_map(self, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
        """Luhman's fixed sin map for an h x w patched grid, omega = 64 / nominal patched side."""
        key = (h, w, like.device, like.dtype)
        if key not in self._pos_cache:
            omega = 64.0 / (self.config.resolution / self.config.patch_size)
            pos = sinusoidal_position_map(self.config.ch0, h, w, omega)
            self._pos_cache[key] = pos.to(device=like.device, dtype=like.dtype)
        return self._pos_cache[key]  # (1, ch0, h, w)

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor | float,
        class_labels: torch.Tensor | None = None,
        embedding: torch.Tensor | None = None,
        extra_channels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        cfg, P = self.config, self.config.patch_size
        B, _, H, W = x.shape
        if H % cfg.size_divisor or W % cfg.size_divisor:
            raise ValueError(
                f"UNet input size {H}x{W} is not divisible by {cfg.size_divisor} "
                f"(patch_size {P} x 2^{len(cfg.channel_mult) - 1} downsamplings); crop or pad it."
            )

        # Input: concatenate conditioning maps, then cut into patches.
        if cfg.extra_in_channels:
            if extra_channels is None or extra_channels.shape[1] != cfg.extra_in_channels:
                raise ValueError(f"This UNet needs extra_channels of shape (B, {cfg.extra_in_channels}, H, W).")
            x = torch.cat([x, extra_channels.to(x.dtype)], dim=1)  # (B, C+E, H, W)
        x = patchify(x, P)  # (B, (C+E)*P*P, H/P, W/P)

        # Conditioning embedding.
        noise_labels = torch.as_tensor(noise_labels, dtype=torch.float32, device=x.device).reshape(-1)
        noise_labels = noise_labels.expand(B) if noise_labels.numel() == 1 else noise_labels  # (B,)
        emb = self.time_embed(timestep_embedding(noise_labels, cfg.model_channels))  # (B, D)
        class_emb = None
        if self.label_embed is not None:
            if class_labels is None:  # no labels: the null label, i.e. the unconditional model
                class_labels = torch.full((B,), cfg.num_classes, dtype=torch.long, device=x.device)
            c = self.label_embed(class_labels.long())  # (B, ch0) if gated else (B, D)
            if cfg.class_gate:
                class_emb = c
            else:
                emb = emb + c
        elif class_labels is not None:
            raise ValueError("class_labels given to a UNet built with num_classes=0.")
        if self.embedding_proj is not None:
            if embedding is None:
                raise ValueError(f"This UNet needs an embedding of shape (B, {cfg.embedding_dim}).")
            emb = emb + self.embedding_proj(embedding.to(emb.dtype))  # (B, D)
        elif embedding is not None:
            raise ValueError("embedding given to a UNet built with embedding_dim=0.")

        # Trunk, entirely at H/P x W/P.
        h = self.input_conv(x)  # (B, ch0, h, w)
        if cfg.position_map:
            h = h + self.position_map(h.shape[2], h.shape[3], h)  # (B, ch0, h, w)
        first = h
        skips = [h]
        for block in self.encoder:
            h = block(h, emb, class_emb)  # (B, ch_l, h/2^l, w/2^l)
            skips.append(h)
        h = self.middle(h, emb, class_emb)  # (B, ch_L, h/2^L, w/2^L)
        for block in self.decoder:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, class_emb)  # (B, ch_l, h/2^l, w/2^l)

        # Mean head, back to full resolution.
        mean = unpatchify(self.out(h), P)  # (B, C_out, H, W)
        if not cfg.learn_sigma:
            return mean

        # Variance head: gradients of v stop at the trunk's features (the time MLP still learns from it).
        feats = torch.cat([first, h], dim=1).detach()  # (B, 2*ch0, h, w)
        feats = feats + self.var_emb(F.silu(emb)[:, :, None, None]).type(feats.dtype)  # (B, 2*ch0, h, w)
        v = unpatchify(self.var_head(feats), P)  # (B, C_out, H, W), in [0, 1]
        return torch.cat([mean, v], dim=1)  # (B, 2*C_out, H, W)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (optionally only those with requires_grad)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


# Named sizes: (model_channels, channel_mult, num_res_blocks, nominal resolution, other UNetConfig fields).
# The 'adm-*-p*' rows are Luhman & Luhman's published configs (learned variance, scale-shift norm,
# 64-channel heads, time embedding mc * mult[-1] = 512, attention at patched sides 16 and 8).
def _preset(mc: int, mult: tuple, blocks: int, resolution: int, **fields) -> dict:
    return dict(model_channels=mc, channel_mult=mult, num_res_blocks=blocks, resolution=resolution, **fields)


_LUHMAN = dict(position_map=True, learn_sigma=True, time_embed_dim=512, attention_resolutions=(16, 8))
UNET_PRESETS: dict[str, dict] = {
    "tiny":         _preset(32,  (1, 2, 2),          1, 32,   attention_resolutions=(8,), head_channels=32),
    "small":        _preset(64,  (1, 2, 2, 2),       2, 64,   attention_resolutions=(16,)),
    "ddpmpp-cifar": _preset(128, (2, 2, 2),          4, 32,   attention_resolutions=(16,), dropout=0.13),
    "adm-64":       _preset(192, (1, 2, 3, 4),       3, 64,   attention_resolutions=(32, 16, 8), dropout=0.1, resblock_updown=True),
    "adm-256-p2":   _preset(128, (1, 2, 2, 4, 4),    2, 256,  patch_size=2, **_LUHMAN),
    "adm-256-p4":   _preset(256, (1, 1, 2, 2),       2, 256,  patch_size=4, **_LUHMAN),
    "adm-256-p8":   _preset(256, (1, 1.5, 2),        3, 256,  patch_size=8, **_LUHMAN),
    "adm-in256-p4": _preset(256, (1, 2, 2, 2),       3, 256,  patch_size=4, num_classes=1000, class_gate=True, **_LUHMAN),
    "adm-1024-p4":  _preset(128, (1, 2, 2, 4, 4, 4), 2, 1024, patch_size=4, **_LUHMAN),
}


def build_unet(preset_or_config: str | UNetConfig, **overrides) -> UNet:
    """Build a UNet from a preset name (see UNET_PRESETS) or a UNetConfig, with field overrides."""
    if isinstance(preset_or_config, UNetConfig):
        config = dataclasses.replace(preset_or_config, **overrides)
    elif preset_or_config in UNET_PRESETS:
        config = UNetConfig(**{**UNET_PRESETS[preset_or_config], **overrides})
    else:
        raise ValueError(f"Unknown UNet preset {preset_or_config!r}; choose one of {sorted(UNET_PRESETS)}.")
    return UNet(config)

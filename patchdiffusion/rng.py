"""Per-sample random streams.

Every random draw that belongs to one training or sampling example comes from a generator seeded
for that example alone, so results do not depend on how examples are grouped into batches or spread
over processes (EDM's StackedRandomGenerator idea). This is what makes 1-process and 2-process
training agree, and what makes sample seed 7 the same image whatever the batch size.
"""

from __future__ import annotations

from typing import Sequence

import torch


def mix_seed(*parts: int) -> int:
    """Combine integers into one 63-bit seed (a SplitMix64-style hash; stable across runs)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h ^= (int(p) + 0x9E3779B97F4A7C15 + ((h << 6) & 0xFFFFFFFFFFFFFFFF) + (h >> 2)) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class SampleRNG:
    """One torch.Generator per example; every draw returns a tensor whose first axis is the example."""

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.generators = []
        for seed in seeds:
            g = torch.Generator(device=self.device)
            g.manual_seed(int(seed) & 0x7FFFFFFFFFFFFFFF)
            self.generators.append(g)

    def __len__(self) -> int:
        return len(self.generators)

    def clone(self) -> "SampleRNG":
        """An independent copy at the same point of every stream: the same draws follow from both."""
        twin = SampleRNG([], self.device)
        for g in self.generators:
            copy = torch.Generator(device=self.device)
            copy.set_state(g.get_state())
            twin.generators.append(copy)
        return twin

    def randn(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Standard normal draws, shape (B, *shape)."""
        return torch.stack([torch.randn(shape, generator=g, device=self.device, dtype=dtype) for g in self.generators])

    def rand(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Uniform [0, 1) draws, shape (B, *shape)."""
        return torch.stack([torch.rand(shape, generator=g, device=self.device, dtype=dtype) for g in self.generators])

    def randint(self, low: int, high: int, *shape: int) -> torch.Tensor:
        """Integer draws in [low, high), shape (B, *shape)."""
        return torch.stack(
            [torch.randint(low, high, shape, generator=g, device=self.device) for g in self.generators]
        )

    def randn_like(self, x: torch.Tensor, step: int | None = None) -> torch.Tensor:
        """Normal noise shaped like x (whose first axis must be the example axis).

        `step` (the samplers' noise_fn(like, step) contract) is ignored: the generators are sequential,
        so the draws follow the order of the calls."""
        if x.shape[0] != len(self.generators):
            raise ValueError(f"batch of {x.shape[0]} but {len(self.generators)} generators")
        return self.randn(*x.shape[1:], dtype=x.dtype)


_DRAWS = ("randn", "rand", "randint", "randn_like")


def keep_draws_out_of_compiled_graphs() -> None:
    """Have torch.compile run SampleRNG's draws as they are, outside its graphs (the numbers do not change).

    Traced, the loop over generators would be cut into one graph piece per example, recompiled for every
    batch size. Called before compiling rather than at import: importing torch's compiler costs a second."""
    for name in _DRAWS:
        draw = getattr(SampleRNG, name)
        if not getattr(draw, "_outside_graphs", False):
            eager = torch.compiler.disable(draw)
            eager._outside_graphs = True
            setattr(SampleRNG, name, eager)

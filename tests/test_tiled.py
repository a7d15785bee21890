"""The tiled denoiser: a canvas denoised by calls on tiles, fused with blend windows.

Two exact references keep these tests honest: one tile covering the canvas must give the untiled
result bit for bit (the weights are w/w = 1 and the accumulator starts at -0.0), and a model that is
elementwise (the closed-form denoiser of Gaussian data) or circular must give the same result however
the canvas is tiled, which checks that the weights form a partition of unity.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from patchdiffusion.diffusion import edm_sigmas
from patchdiffusion.diffusion.samplers import get_sampler
from patchdiffusion.diffusion.tiled import (
    TiledDenoiser,
    TilingConfig,
    TilingError,
    check_tiling,
    plan_axis,
    window,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


class ConvTiles:
    """A tiny conv-net denoiser of tiles (zero padding), optionally class-conditional and with a learned
    variance output: x0 = x / (1 + σ²) + 0.1·net(x / √(1 + σ²)) (+ a class offset)."""

    def __init__(self, tile=(16, 24), halo: int = 0, learned_variance: bool = False, classes: int = 0):
        generator = torch.Generator().manual_seed(0)
        self.tile, self.halo, self.learned_variance = tile, halo, learned_variance
        out = 6 if learned_variance else 3
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, out, 3, padding=1))
        for p in self.net.parameters():
            p.data = torch.randn(p.shape, generator=generator) * 0.3
        self.embedding = torch.randn(max(classes, 1), 3, 1, 1, generator=generator) * 0.1
        self.calls = []

    @torch.no_grad()
    def __call__(self, x, sigma, boxes=None, class_labels=None):
        self.calls.append(boxes)
        s = sigma.reshape(-1, 1, 1, 1).to(x.dtype)
        h = self.net.to(x.dtype)(x / (1 + s * s).sqrt())
        x0 = x / (1 + s * s) + 0.1 * h[:, :3]
        if class_labels is not None:
            x0 = x0 + self.embedding.to(x.dtype)[class_labels]
        if self.halo:
            x0 = x0[:, :, self.halo:-self.halo, self.halo:-self.halo]
        return (x0, torch.sigmoid(h[:, 3:])) if self.learned_variance else x0


def untiled(model):
    return lambda x, sigma, **cond: model(x, sigma, None, **cond)


def step_noise(seed: int):
    """A noise_fn keyed by the step (the same draws in every run)."""
    return lambda like, step: torch.randn(like.shape, generator=torch.Generator().manual_seed(seed * 1000 + step),
                                          dtype=like.dtype)


MU, S = 0.3, 0.5


class GaussianTiles:
    """The ideal denoiser of x0 ~ N(MU, S²) per element: elementwise, so any tiling must reproduce it."""

    def __init__(self, tile=(32, 48), halo=0):
        self.tile, self.halo = tile, halo

    def __call__(self, x, sigma, boxes=None):
        s = sigma.reshape(-1, 1, 1, 1).to(x.dtype)
        if self.halo:
            x = x[:, :, self.halo:-self.halo, self.halo:-self.halo]
        return MU + S**2 / (S**2 + s**2) * (x - MU)


# ----------------------------------------------------------------------------------------------
# One tile covering the canvas == untiled, bit for bit, for every sampler.

SAMPLER_CASES = [
    ("euler", {}),
    ("heun", dict(S_churn=20.0, S_min=0.05, S_max=50.0)),
    ("ddim", dict(eta=0.0)),
    ("ddim", dict(eta=1.0)),
    ("ddpm", dict(variance="small")),
    ("ddpm", dict(variance="learned")),
    ("dpmpp_2m", {}),
]


@pytest.mark.parametrize("name, options", SAMPLER_CASES, ids=[f"{n}-{o}" for n, o in SAMPLER_CASES])
def test_one_tile_covering_the_canvas_is_untiled_bit_for_bit(name, options):
    learned = options.get("variance") == "learned"
    model = ConvTiles(tile=(24, 40), learned_variance=learned, classes=3)
    sigmas = edm_sigmas(6)
    x = torch.randn(2, 3, 24, 40, generator=torch.Generator().manual_seed(1)) * sigmas[0].item()
    labels = torch.tensor([2, 0])
    sampler = get_sampler(name)
    reference = sampler(untiled(model), x, sigmas, noise_fn=step_noise(3), extra_args=dict(class_labels=labels),
                        **options)
    tiled = TiledDenoiser(model, TilingConfig(window="cosine", batch=4))
    ours = sampler(tiled, x, sigmas, noise_fn=step_noise(3), extra_args=dict(class_labels=labels), **options)
    assert torch.equal(ours.view(torch.int32), reference.view(torch.int32))  # the same bits, -0.0 included
    assert tiled.tiles_done == 2 * tiled.calls  # one tile per canvas and call


# ----------------------------------------------------------------------------------------------
# Windows and weights.


@pytest.mark.parametrize("kind", ["uniform", "linear", "cosine", "gaussian"])
def test_windows_are_positive_one_in_the_middle_and_complementary_across_an_overlap(kind):
    w = window(kind, 32, 8)
    assert w.shape == (32,) and (w > 0).all() and torch.allclose(w, w.flip(0))
    if kind in ("uniform", "linear", "cosine"):
        assert (w[8:24] == 1).all()
    if kind in ("linear", "cosine"):  # tile A's right taper + tile B's left taper (B starts at 32 - 8)
        torch.testing.assert_close(w[24:] + w[:8], torch.ones(8, dtype=torch.float64))
    if kind == "gaussian":
        assert w[15] > 0.95 and w[0] < 1e-4  # std 0.1 of the tile side


@pytest.mark.parametrize("grid, wrap, offset", [("fixed", False, 0), ("random", False, 5), ("fixed", True, 0),
                                                ("random", True, 11)])
@pytest.mark.parametrize("kind", ["uniform", "linear", "cosine", "gaussian"])
def test_factors_form_a_partition_of_unity(kind, grid, wrap, offset):
    plan = plan_axis(100, 32, 12, halo=2, offset=offset, grid=grid, wrap=wrap, window_kind=kind)
    total = torch.zeros(100, dtype=torch.float64)
    for runs, f in zip(plan.outputs, plan.factors):
        for run in runs:
            total[run.src:run.src + run.length] += f[run.dst:run.dst + run.length]
    torch.testing.assert_close(total, torch.ones(100, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["uniform", "linear", "cosine", "gaussian"])
@pytest.mark.parametrize("grid, wrap", [("fixed", False), ("random", False), ("random", True)])
def test_an_elementwise_denoiser_is_reproduced_by_any_tiling(kind, grid, wrap):
    """The fused estimate of an elementwise model is the model itself: weights summing to one."""
    model = GaussianTiles(tile=(32, 48), halo=3)
    x = torch.randn(2, 3, 96, 160, generator=torch.Generator().manual_seed(0)) * 5
    sigma = torch.tensor([2.0, 0.7])
    tiled = TiledDenoiser(model, TilingConfig(overlap=(10, 16), window=kind, grid=grid, wrap=wrap, batch=7))
    expected = MU + S**2 / (S**2 + sigma.reshape(-1, 1, 1, 1) ** 2) * (x - MU)
    torch.testing.assert_close(tiled(x, sigma), expected, rtol=1e-6, atol=1e-6)


def test_a_fixed_grid_clamps_the_last_tile_and_a_random_grid_mirrors_the_canvas():
    plan = plan_axis(100, 32, 8, grid="fixed")
    assert plan.starts == (0, 24, 48, 68) and plan.mirror == (0, 0)
    moved = plan_axis(100, 32, 8, halo=2, offset=5, grid="random")
    assert moved.starts == (-5, 19, 43, 67, 91) and moved.mirror == (5, 23)
    # Window positions -7..-6 are the zero halo, -5..-1 mirror rows 5..1, then the canvas from row 0.
    assert expand(moved.inputs[0], 36) == [None, None, 5, 4, 3, 2, 1] + list(range(29))
    assert expand(moved.inputs[-1], 36)[-5:] == [78, 77, 76, None, None]  # rows 100..122 mirror 98..76, then zeros
    assert expand(moved.outputs[0], 32) == [None] * 5 + list(range(27))  # only pixels on the canvas are written


def expand(runs, length):
    """Per window position, the canvas index that the runs read (None: zero)."""
    sources = [None] * length
    for run in runs:
        for n in range(run.length):
            sources[run.dst + n] = run.src + n * run.step
    return sources


def test_halo_reads_zeros_beyond_the_canvas_on_a_fixed_grid():
    seen = []

    class Probe:
        tile, halo = (8, 8), 2

        def __call__(self, x, sigma, boxes):
            seen.extend(zip(x, boxes))
            return x[:, :, 2:-2, 2:-2]

    x = torch.arange(1 * 1 * 16 * 16, dtype=torch.float32).reshape(1, 1, 16, 16) + 1
    out = TiledDenoiser(Probe(), TilingConfig(overlap=(0, 0)))(x, 1.0)
    assert torch.equal(out, x)
    window_in, box = seen[0]
    assert (box.top, box.left, box.height, box.width, box.canvas) == (0, 0, 8, 8, (16, 16))
    assert (window_in[:, :2] == 0).all() and (window_in[:, :, :2] == 0).all()
    assert torch.equal(window_in[0, 2:, 2:], x[0, 0, :10, :10])


# ----------------------------------------------------------------------------------------------
# The moving grid, wrap, conditioning and progress.


def test_random_grid_offsets_change_with_sigma_and_are_reproducible():
    model = ConvTiles(tile=(16, 24))
    tiled = TiledDenoiser(model, TilingConfig(grid="random", overlap=(4, 6), seed=5))
    offsets = [tiled.grid_offset(s) for s in edm_sigmas(8).tolist()]
    assert len(set(offsets)) > 4 and all(0 <= dy < 12 and 0 <= dx < 18 for dy, dx in offsets)
    again = TiledDenoiser(ConvTiles(tile=(16, 24)), TilingConfig(grid="random", overlap=(4, 6), seed=5))
    assert [again.grid_offset(s) for s in edm_sigmas(8).tolist()] == offsets  # a resumed run: the same grids
    other = TiledDenoiser(model, TilingConfig(grid="random", overlap=(4, 6), seed=6))
    assert [other.grid_offset(s) for s in edm_sigmas(8).tolist()] != offsets
    x = torch.randn(1, 3, 40, 56)
    tiled(x, 3.0)
    calls = len(model.calls)
    tiled(x, 2.0)
    first, second = model.calls[0][0], model.calls[calls][0]  # the first tile of each denoiser call
    assert (first.top, first.left) == tuple(-o for o in tiled.grid_offset(3.0))
    assert (second.top, second.left) == tuple(-o for o in tiled.grid_offset(2.0))
    assert TiledDenoiser(model, TilingConfig()).grid_offset(3.0) == (0, 0)


class CircularTiles:
    """A 3x3 conv that reads a halo of 1 and outputs the tile (no padding)."""

    tile, halo = (16, 16), 1

    def __init__(self):
        self.kernel = torch.randn(3, 3, 3, 3, generator=torch.Generator().manual_seed(2))

    def __call__(self, x, sigma, boxes):
        return F.conv2d(x, self.kernel)


@pytest.mark.parametrize("grid", ["fixed", "random"])
def test_wrap_equals_the_circular_conv_of_the_canvas_and_tiles_with_itself(grid):
    model = CircularTiles()
    x = torch.randn(1, 3, 40, 56, generator=torch.Generator().manual_seed(3))
    whole = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="circular"), model.kernel)
    tiled = TiledDenoiser(model, TilingConfig(overlap=(4, 4), window="uniform", grid=grid, wrap=True))
    out = tiled(x, 0.5)
    torch.testing.assert_close(out, whole, rtol=1e-5, atol=1e-5)
    # Circular: rolling the input rolls the output (what makes the result tile with itself).
    torch.testing.assert_close(tiled(torch.roll(x, (7, 13), (2, 3)), 0.5), torch.roll(out, (7, 13), (2, 3)),
                               rtol=1e-5, atol=1e-5)
    # A tile larger than a wrapped canvas reads and writes around it more than once.
    small = x[:, :, :12, :10]
    torch.testing.assert_close(tiled(small, 0.5), F.conv2d(F.pad(small, (1, 1, 1, 1), mode="circular"), model.kernel),
                               rtol=1e-5, atol=1e-5)


def test_conditioning_is_indexed_per_tile_and_progress_is_reported():
    model = ConvTiles(tile=(16, 24), classes=3)
    counts = []
    tiled = TiledDenoiser(model, TilingConfig(overlap=(4, 6), batch=5), on_tiles=counts.append)
    x = torch.randn(2, 3, 40, 56, generator=torch.Generator().manual_seed(4))
    labels = torch.tensor([1, 2])
    out = tiled(x, torch.tensor([1.0, 1.0]), class_labels=labels)
    per_canvas = tiled.count((40, 56))
    assert sum(counts) == 2 * per_canvas == tiled.tiles_done and max(counts) == 5
    # Each canvas gets its own label: the same as tiling the two canvases one at a time.
    for b in range(2):
        alone = TiledDenoiser(model, TilingConfig(overlap=(4, 6), batch=5))
        alone = alone(x[b:b + 1], 1.0, class_labels=labels[b:b + 1])
        torch.testing.assert_close(out[b:b + 1], alone, rtol=1e-6, atol=1e-6)


def test_impossible_tilings_raise_one_clear_line():
    model = ConvTiles(tile=(16, 24))
    cases = [
        (TilingConfig(overlap=(16, 4)), "overlap must be in"),
        (TilingConfig(overlap=(-1, 4)), "overlap must be in"),
        (TilingConfig(window="hann"), "window must be one of"),
        (TilingConfig(grid="shifted"), "grid must be one of"),
        (TilingConfig(batch=0), "tile batch"),
        (TilingConfig(tile=(0, 8)), "tile must be positive"),
        (TilingConfig(passes=0), "passes must be a positive int"),
        (TilingConfig(passes_last=-1), "passes_last must be an int >= 0"),
    ]
    for config, message in cases:
        with pytest.raises(TilingError, match=message) as error:
            check_tiling((64, 64), config, model)
        assert "\n" not in str(error.value)
    with pytest.raises(TilingError, match="smaller than the model's 16x24 tile"):
        check_tiling((64, 20), TilingConfig(), model)
    assert check_tiling((12, 20), TilingConfig(wrap=True), model) == ((16, 24), (4, 6))
    with pytest.raises(TilingError, match="smaller"):
        TiledDenoiser(model)(torch.zeros(1, 3, 8, 8), 1.0)


# ----------------------------------------------------------------------------------------------
# Passes: the mean of several grids per call.


@pytest.mark.parametrize("grid", ["fixed", "random"])
def test_passes_average_the_grids_at_their_own_offsets(grid):
    """D = (1/K) Σ_p D_p: each pass is the one-grid estimate of the grid at that pass's offset."""
    model = ConvTiles(tile=(16, 24))
    x = torch.randn(2, 3, 40, 56, generator=torch.Generator().manual_seed(5))
    sigma = torch.tensor([1.5, 0.4])
    config = TilingConfig(overlap=(4, 6), grid=grid, passes=3, batch=5, seed=2)
    tiled = TiledDenoiser(model, config)
    out = tiled(x, sigma)
    expected = torch.zeros_like(x)
    for b in range(2):
        for p in range(3):
            offset = tiled.grid_offset(float(sigma[b]), p)
            one = TiledDenoiser(model, TilingConfig(overlap=(4, 6), grid=grid if p == 0 else "random"))
            one.grid_offset = lambda s, pass_index=0, offset=offset: offset  # this pass's grid alone
            expected[b:b + 1] += one(x[b:b + 1], float(sigma[b])) / 3
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    # Three grids spread over the stride (12, 18): moved on by about a third of it each, in steps coprime
    # with the stride (5 of 12, 7 of 18; 4 and 6 would share factors with them).
    (dy, dx), *others = [tiled.grid_offset(1.5, p) for p in range(3)]
    assert others == [((dy + 5) % 12, (dx + 7) % 18), ((dy + 10) % 12, (dx + 14) % 18)]
    if grid == "fixed":
        assert tiled.grid_offset(1.5, 0) == (0, 0)
    # An elementwise model is still reproduced exactly: each pass is a partition of unity.
    gaussian = TiledDenoiser(GaussianTiles(tile=(16, 24)), config)
    torch.testing.assert_close(gaussian(x, sigma), MU + S**2 / (S**2 + sigma.reshape(-1, 1, 1, 1) ** 2) * (x - MU),
                               rtol=1e-6, atol=1e-6)


def test_passes_last_limits_the_passes_to_the_last_steps_and_the_tile_count_follows():
    model = ConvTiles(tile=(16, 24))
    sigmas = edm_sigmas(6)
    tiled = TiledDenoiser(model, TilingConfig(overlap=(4, 6), grid="random", passes=4, passes_last=2))
    tiled.set_schedule(sigmas)
    used = [tiled.passes_at(float(torch.tensor(s, dtype=torch.float32))) for s in sigmas[:-1].tolist()]
    assert used == [1, 1, 1, 1, 4, 4]
    one_grid = [tiled.plan((40, 56), s).count for s in sigmas[:-1].tolist()]
    assert tiled.count((40, 56), float(sigmas[-2])) > 3 * one_grid[-1]
    counts = []
    tiled.on_tiles = counts.append
    get_sampler("euler")(tiled, torch.randn(1, 3, 40, 56) * sigmas[0], sigmas)
    assert sum(counts) == sum(tiled.count((40, 56), s) for s in sigmas[:-1].tolist())
    # Every step when passes_last is 0, and one pass changes nothing at all.
    every = TiledDenoiser(model, TilingConfig(grid="random", passes=2))
    every.set_schedule(sigmas)
    assert all(every.passes_at(s) == 2 for s in sigmas[:-1].tolist())
    x = torch.randn(1, 3, 40, 56, generator=torch.Generator().manual_seed(6))
    plain = TiledDenoiser(model, TilingConfig(overlap=(4, 6), grid="random", seed=1))(x, 0.8)
    single = TiledDenoiser(model, TilingConfig(overlap=(4, 6), grid="random", seed=1, passes=1, passes_last=3))
    single.set_schedule(sigmas)
    assert torch.equal(single(x, 0.8), plain)


def test_pass_steps_are_near_a_kth_of_the_stride_and_reach_every_phase_of_a_patch_grid():
    from patchdiffusion.diffusion.tiled import _pass_step

    assert [_pass_step(24, k) for k in (2, 3, 4, 6)] == [13, 7, 7, 5]
    assert _pass_step(32, 4) == 9 and _pass_step(1, 4) == 1
    for patch in (2, 4, 8):  # 4 passes at stride 24 or 32 see every phase of a 2, 4 or 8 px patch grid
        for stride in (24, 32):
            phases = {(p * _pass_step(stride, 4)) % stride % patch for p in range(4)}
            assert len(phases) == min(patch, 4), (patch, stride)

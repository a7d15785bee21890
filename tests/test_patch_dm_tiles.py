"""Patch-DM's collage tiles, its moving window grid (model.grid_shift=random) and positions=auto."""

import numpy as np
import pytest
import torch

from patchdiffusion.errors import ConfigError
from patchdiffusion.methods.patch_dm import plan_tiles
from patchdiffusion.rng import SampleRNG
from test_patch_dm import make


@pytest.mark.parametrize("collage", [True, False])
def test_tiles_cover_the_grid_once_within_the_budget(collage):
    extra = 1 if collage else 0
    for ny, nx, budget in [(1, 1, 4), (3, 7, 9), (16, 32, 64), (5, 2, 12), (64, 64, 64)]:
        count = np.zeros((ny, nx), int)
        for tile in plan_tiles(ny, nx, budget, collage):
            assert (tile.rows + extra) * (tile.cols + extra) <= budget
            count[tile.row:tile.row + tile.rows, tile.col:tile.col + tile.cols] += 1
        assert (count == 1).all()
    with pytest.raises(ConfigError, match="patch_batch"):
        plan_tiles(4, 4, 3, True)


# ------------------------------------------------------------------------------------------------
# the moving window grid (model.grid_shift=random) and positions=auto


@pytest.mark.parametrize("as_numpy", [False, True])
def test_read_region_mirrors_then_pads_with_zeros(as_numpy):
    from patchdiffusion.methods.patch_dm import read_region

    canvas = torch.randn(3, 8, 12)
    source = canvas.numpy() if as_numpy else canvas
    mirrored = torch.nn.functional.pad(canvas[None], (5, 3, 2, 6), mode="reflect")[0]  # left, right, top, bottom
    moved = torch.nn.functional.pad(mirrored, (4, 4, 4, 4))  # then the collage's zero pad
    region = read_region(source, -6, 18, -9, 19, mirror=(2, 6, 5, 3))
    torch.testing.assert_close(region, moved[:, -6 + 6:18 + 6, -9 + 9:19 + 9], rtol=0, atol=0)
    inside = read_region(source, 1, 5, 2, 9, mirror=(2, 6, 5, 3))  # wholly inside: a plain slice
    torch.testing.assert_close(inside, canvas[:, 1:5, 2:9])


def test_grid_offset_fixed_is_zero_random_is_keyed_by_sigma():
    method, _ = make("model.grid_shift=fixed")
    assert {method.grid_offset(s) for s in (0.1, 1.0, 80.0)} == {(0, 0)}
    method, _ = make("model.grid_shift=random")
    p = method.patch_size
    offsets = [method.grid_offset(float(s)) for s in method.sampling_sigmas(50)[:-1]]
    assert offsets == [method.grid_offset(float(s)) for s in method.sampling_sigmas(50)[:-1]]  # deterministic
    assert all(0 <= dy < p and 0 <= dx < p for dy, dx in offsets)
    assert len(set(offsets)) > 40  # a different grid (almost) every step
    with pytest.raises(ConfigError, match="grid_shift"):
        make("model.grid_shift=sometimes")


def test_positions_auto_drops_positions_beyond_the_training_grid():
    method, _ = make("model.positions=auto", resolution=32)
    keep = torch.ones(2)
    assert method.position_keep(keep, 32, 32).tolist() == [1.0, 1.0]
    assert method.position_keep(keep, 32, 64).tolist() == [0.0, 0.0]
    method, _ = make("model.positions=grid", resolution=32)
    assert method.position_keep(keep, 128, 128).tolist() == [1.0, 1.0]


class WindowBiasNet(torch.nn.Module):
    """A stand-in collage net whose x0 prediction is the ideal one for white Gaussian data of
    variance v = 0.04 (x̂0 = v·x/(v + σ²) in EDM units) plus an error that is constant over each decoded window and
    proportional to σ: the kind of per-window mistake that leaves seams on the window grid."""

    def __init__(self, schedule, p):
        super().__init__()
        self.schedule, self.p, self.codes = schedule, p, None

    def forward(self, patches, t, positions, grid, code=None, position_keep=None, mode="collage", **_):
        from patchdiffusion.nets.collage import collage

        rows, cols = grid
        windows = collage(patches, rows, cols)  # the pixels of each decoded window (VP units)
        t_w = collage(t.view(-1, 1, 1, 1).expand(-1, 1, 2, 2), rows, cols)[:, 0, 0, 0]
        pos_w = collage(positions.view(-1, 2, 1, 1).expand(-1, 2, 2, 2), rows, cols)[:, :, 0, 0] + 0.5
        sigma = self.schedule.t_to_sigma(t_w).view(-1, 1, 1, 1)
        alpha = 1 / (1 + sigma**2).sqrt()
        x = windows / alpha
        bias = torch.sin(12.9898 * pos_w[:, :1] + 78.233 * pos_w[:, 1:]).view(-1, 1, 1, 1) * 0.3
        return x * 0.04 / (0.04 + sigma**2) + bias * sigma / (1 + sigma)


def worst_seam(images, p):
    from patchdiffusion.eval.seam import seam_score

    x = ((images.clamp(-1, 1) + 1) * 127.5).round()
    return max(seam_score(x, p, offset=(dy, dx)).score for dy in range(0, p, 2) for dx in range(0, p, 2))


def test_a_moving_grid_spreads_per_window_errors_instead_of_stacking_them():
    """The reason for grid_shift=random, in miniature: per-window errors stack into seams on a fixed
    grid; on a moving grid no line gets more than one step's share, wherever the seams are looked for."""
    scores = {}
    for shift in ("fixed", "random"):
        method, _ = make("model.prediction=x0", f"model.grid_shift={shift}", "model.net.code_dim=0")
        net = WindowBiasNet(method.schedule, method.patch_size)
        rng = SampleRNG([0, 1])
        out = method.sample(net, rng, 64, 64, sampler="ddim", steps=25)
        scores[shift] = worst_seam(out, method.patch_size)
    assert scores["fixed"] > 1.15  # 1.25 when written
    assert scores["random"] - 1 < 0.35 * (scores["fixed"] - 1)  # 1.04

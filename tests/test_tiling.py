"""Memory-bounded Patch-DM canvases (patchdiffusion/tiling.py): tiles, storage, streamed PNGs."""

import numpy as np
import pytest
import torch
from PIL import Image

from patchdiffusion.config import ConfigError
from patchdiffusion.methods.patch_dm import plan_tiles
from patchdiffusion.rng import SampleRNG
from patchdiffusion.tiling import CanvasStore, sample_canvas, write_png_streaming
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


@pytest.mark.parametrize("guidance", [1.0, 1.5])
def test_tiled_ddim_equals_whole_canvas_sampling(guidance):
    """DDIM (η = 0) tile by tile from x_T equals Method.sample on the whole canvas from the same x_T."""
    method, net = make("model.patch_batch=9")
    H, W = 48, 80
    x_T = torch.randn(1, 3, H, W)
    rng = SampleRNG([0])
    rng.randn = lambda *shape, **kw: x_T
    code = net.codes.weight[3].detach()
    whole = method.sample(net, rng, H, W, sampler="ddim", steps=4, guidance=guidance, codes=code[None])
    sigma_max = float(method.sampling_sigmas(4)[0])
    tiled = sample_canvas(method, net, H, W, seed=0, code=code, steps=4, guidance=guidance, x_init=x_T[0] * sigma_max)
    assert len(method.tiles(H, W)) > 1  # it really was cut into tiles
    torch.testing.assert_close(torch.from_numpy(tiled.store.current.copy()), whole[0], atol=2e-4, rtol=0)


def test_disk_and_memory_and_patch_batch_agree():
    """DDPM with per-patch noise: the canvas does not depend on storage or on the tile size."""
    method, net = make("model.patch_batch=9")
    code = net.codes.weight[1].detach()
    runs = []
    for storage, budget in [("memory", 9), ("disk", 9), ("memory", 64)]:
        method.config.patch_batch = budget
        result = sample_canvas(method, net, 32, 64, seed=7, code=code, sampler="ddpm", steps=3, storage=storage)
        runs.append(np.array(result.store.current))
        result.store.close()
    assert np.array_equal(runs[0], runs[1])
    np.testing.assert_allclose(runs[0], runs[2], atol=2e-4)  # batch size changes float summation order


def test_unsupported_sampler_and_size():
    method, net = make()
    with pytest.raises(ConfigError, match="ddim"):
        sample_canvas(method, net, 32, 32, seed=0, code=torch.zeros(8), sampler="heun")
    with pytest.raises(ConfigError, match="multiple"):
        sample_canvas(method, net, 32, 36, seed=0, code=torch.zeros(8))


def test_disk_store_is_memory_mapped(tmp_path):
    store = CanvasStore(3, 64, 96, "disk", str(tmp_path))
    assert isinstance(store.current, np.memmap) and store.nbytes == 2 * 3 * 64 * 96 * 4
    store.write_next(0, 32, torch.ones(3, 16, 16))
    store.swap()
    region = store.read(-8, 24, 24, 56)  # partly outside: zeros there
    assert region.shape == (3, 32, 32) and region[:, :8].abs().sum() == 0 and region[:, 8:24, 8:24].eq(1).all()
    store.close()


def test_streaming_png_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    path = write_png_streaming(tmp_path / "x.png", 37, 53, (image[y:y + 10] for y in range(0, 37, 10)))
    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), image)

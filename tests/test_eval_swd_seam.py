"""Weight-free metrics on built-in images: SWD (ProGAN) and the seam score, and the training monitor."""

import time

import numpy as np
import pytest
import torch
import scipy.ndimage

from patchdiffusion.data import open_source
from patchdiffusion.eval import SWDMonitor, seam_score, sliced_wasserstein_distance
from patchdiffusion.eval.swd import SWDDescriptors, extract_patches, laplacian_pyramid, pyramid_up, swd_between


def builtin_images(spec: str, size: int) -> torch.Tensor:
    source = open_source(spec, resolution=size)
    pixels = np.stack([source.read(i) for i in range(len(source))])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W) uint8


@pytest.fixture(scope="module")
def photos64():
    return builtin_images("builtin:photos?count=64", 64)


@pytest.fixture(scope="module")
def photos64_descriptors(photos64):
    """The SWD descriptors of photos64, collected once for every comparison."""
    collector = SWDDescriptors(seed=0)
    collector.add(photos64)
    return collector


def swd_to(reference: SWDDescriptors, images: torch.Tensor):
    collector = SWDDescriptors(seed=reference.seed)
    collector.add(images)
    return swd_between(collector, reference)


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    pixels = images.numpy().astype(np.float32)
    blurred = scipy.ndimage.gaussian_filter(pixels, sigma=(0, 0, sigma, sigma), mode="mirror")
    return torch.from_numpy(blurred).round().clamp(0, 255).to(torch.uint8)


def add_noise(images: torch.Tensor, std: float) -> torch.Tensor:
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0)) * std
    return (images.float() + noise).round().clamp(0, 255).to(torch.uint8)


# ------------------------------------------------------------------------------------------------
# SWD


def test_laplacian_pyramid_reconstructs_the_image():
    images = torch.rand(2, 3, 64, 48) * 255
    levels = laplacian_pyramid(images)
    assert [tuple(level.shape[2:]) for level in levels] == [(64, 48), (32, 24), (16, 12)][: len(levels)]
    rebuilt = levels[-1]
    for band in reversed(levels[:-1]):
        rebuilt = band + pyramid_up(rebuilt, band.shape[2:])
    torch.testing.assert_close(rebuilt, images, rtol=0, atol=1e-3)


def test_patches_are_7x7_neighbourhoods_in_channel_major_order():
    level = torch.arange(2 * 3 * 10 * 12, dtype=torch.float32).view(2, 3, 10, 12)
    corners = torch.tensor([[[0, 0], [3, 5]], [[2, 1], [3, 5]]])
    descriptors = extract_patches(level, corners)
    assert descriptors.shape == (4, 147)
    torch.testing.assert_close(descriptors[1], level[0, :, 3:10, 5:12].reshape(-1))
    torch.testing.assert_close(descriptors[2], level[1, :, 2:9, 1:8].reshape(-1))


def test_swd_descriptors_do_not_depend_on_batching(photos64):
    images = photos64[:20]
    whole, pieces = SWDDescriptors(seed=3), SWDDescriptors(seed=3)
    whole.add(images)
    for start in range(0, 20, 7):
        pieces.add(images[start:start + 7])
    for a, b in zip(whole.levels(), pieces.levels()):
        assert torch.equal(a, b)


def test_swd_is_zero_for_a_set_with_itself(photos64, photos64_descriptors):
    result = swd_to(photos64_descriptors, photos64.clone())
    assert list(result.levels) == [64, 32, 16]
    assert result.average < 1e-6 and all(v < 1e-6 for v in result.levels.values())
    small = sliced_wasserstein_distance(photos64[:10], photos64[:10].clone(), batch_size=3)  # the one-call form
    assert small.average < 1e-6


def test_swd_grows_monotonically_with_blur(photos64, photos64_descriptors):
    values = [swd_to(photos64_descriptors, gaussian_blur(photos64, s)).average for s in (0.5, 1.0, 2.0, 3.0)]
    assert all(a < b for a, b in zip(values, values[1:])), values
    assert values[0] > 1.0


def test_swd_grows_monotonically_with_noise(photos64, photos64_descriptors):
    values = [swd_to(photos64_descriptors, add_noise(photos64, s)).average for s in (3, 8, 20, 40)]
    assert all(a < b for a, b in zip(values, values[1:])), values
    assert values[0] > 1.0


def test_swd_of_two_samples_of_one_distribution_is_small_next_to_a_blur(photos64, photos64_descriptors):
    # At the finest level, where blur acts; coarse levels of a few crops of 9 photos vary more from draw to draw.
    other = builtin_images(f"builtin:photos?count={len(photos64)}&seed=1", 64)
    same_distribution = swd_to(photos64_descriptors, other).levels[64]
    blurred = swd_to(photos64_descriptors, gaussian_blur(photos64, 1.0)).levels[64]
    assert same_distribution < blurred / 3, (same_distribution, blurred)


# ------------------------------------------------------------------------------------------------
# Seam score


def brighten_alternate_tiles(images: torch.Tensor, tile: int, factor: float) -> torch.Tensor:
    rows = torch.arange(images.shape[2]) // tile
    cols = torch.arange(images.shape[3]) // tile
    alternate = (rows[:, None] + cols[None, :]) % 2 == 1  # a checkerboard of tiles
    return torch.where(alternate, (images.float() * factor).clamp(0, 255), images.float())


def test_seam_score_is_one_on_photos_and_large_with_brightened_tiles():
    photos = builtin_images("builtin:photos?count=200", 128)
    natural = seam_score(photos, 32)  # a 4x4 grid
    assert natural.score <= 1.05 and natural.score >= 0.95, natural
    shifted = seam_score(brighten_alternate_tiles(photos, 32, 1.10), 32)
    assert shifted.score >= 1.5, shifted
    print(f"seam score, 200 photos 128px, 32px tiles: natural {natural.score:.3f}, "
          f"alternate tiles +10% {shifted.score:.3f}")


def test_seam_score_on_a_finer_grid_and_with_an_offset(photos64):
    assert 0.95 <= seam_score(photos64, 16).score <= 1.05
    assert 0.95 <= seam_score(photos64, (16, 8), offset=(5, 3)).score <= 1.05
    # A seam exactly on the offset grid is found; the same seam is invisible to a grid elsewhere.
    seamed = brighten_alternate_tiles(torch.roll(photos64, shifts=(5, 5), dims=(2, 3)), 16, 1.3)
    assert seam_score(seamed, 16, offset=(0, 0)).score > 2.0
    assert seam_score(photos64, 16, offset=(8, 8)).score < 1.05


def test_seam_score_ignores_image_edges():
    # A flat image with a constant ramp: every step is the same, boundaries included.
    ramp = torch.arange(64, dtype=torch.float32).repeat(1, 3, 64, 1)
    assert seam_score(ramp, 16).score == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------
# Monitor


def test_swd_monitor_is_cheap_and_zero_on_its_reference():
    reference = builtin_images("builtin:photos?count=256", 32)
    monitor = SWDMonitor(reference, num_images=256, seed=0)
    as_float = reference.float() / 127.5 - 1  # what a sampler returns
    start = time.perf_counter()
    same = monitor(as_float)
    noise = torch.randn(as_float.shape, generator=torch.Generator().manual_seed(0))
    noisy = monitor((as_float + 0.2 * noise).clamp(-1, 1))
    elapsed = time.perf_counter() - start
    assert set(same) == {"swd", "swd_32", "swd_16"}
    assert same["swd"] == pytest.approx(0.0, abs=1e-6)
    assert noisy["swd"] > 10 * max(same["swd"], 1e-3)
    assert elapsed < 20  # two calls; about a second each on a lightly loaded 2-core CPU

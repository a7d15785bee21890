"""seam_profile (per-column/row sums) gives seam_score's numbers at every offset, fast enough for 1024²;
the wrap-edge score finds an edge that does not tile and leaves one that does among the lines elsewhere."""

import time

import pytest
import torch

from patchdiffusion.eval.errors import EvalError
from patchdiffusion.eval.seam import line_seam, seam_profile, seam_score, wrap_seam


def test_profile_equals_seam_score_at_every_offset():
    g = torch.Generator().manual_seed(0)
    tiles = (torch.arange(53) // 9 % 2) * 60  # every other 9-pixel column tile 60 levels brighter: seams
    images = (torch.randint(0, 20, (2, 3, 40, 53), generator=g) + tiles).to(torch.uint8)
    profile = seam_profile(images, (7, 9))
    scores = {(dy, dx): seam_score(images, (7, 9), offset=(dy, dx)).score for dy in range(7) for dx in range(9)}
    worst = max(scores, key=scores.get)
    assert profile.at_grid == pytest.approx(scores[(0, 0)], rel=1e-9)
    assert profile.worst == pytest.approx(scores[worst], rel=1e-9) and profile.worst_offset == worst
    assert profile.mean == pytest.approx(sum(scores.values()) / len(scores), rel=1e-9)
    assert profile.worst_offset[1] == 0 and profile.worst > 2  # the column seams stand out


def test_profile_of_a_large_image_is_quick():
    images = torch.randint(0, 256, (1, 3, 1024, 1024), dtype=torch.uint8)
    started = time.process_time()
    profile = seam_profile(images, 24)
    assert time.process_time() - started < 20
    assert profile.worst == pytest.approx(1.0, abs=0.02)  # noise has no seams


def test_profile_refuses_a_single_tile():
    with pytest.raises(EvalError, match="single"):
        seam_profile(torch.zeros(1, 3, 8, 8), 8)


def periodic_texture(count: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Smooth noise that tiles with itself: white noise blurred by a circular (FFT) filter, 0..255."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(count, 3, height, width, generator=g, dtype=torch.float64)
    fy, fx = torch.fft.fftfreq(height)[:, None], torch.fft.fftfreq(width)[None, :]
    smooth = torch.fft.ifft2(torch.fft.fft2(noise) * torch.exp(-(fy ** 2 + fx ** 2) * 150)).real
    return (128 + 40 * smooth / smooth.std()).clamp(0, 255)


@pytest.mark.parametrize("height,width", [(40, 60), (41, 59)])
def test_line_seam_is_the_score_of_the_image_rolled_to_that_line(height, width):
    images = periodic_texture(2, height, width)
    half = (height // 2, width // 2)
    rolled = torch.roll(images, shifts=half, dims=(2, 3))
    assert line_seam(images, (0, 0)).score == pytest.approx(seam_score(rolled, half).score, rel=1e-12)
    for at in [(7, 11), (1, width - 1), (height - 3, 2)]:  # a line elsewhere: rolled so that line is the middle
        moved = torch.roll(images, shifts=(half[0] - at[0], half[1] - at[1]), dims=(2, 3))
        assert line_seam(images, at).score == pytest.approx(seam_score(moved, half).score, rel=1e-12)


def test_wrap_seam_tells_an_edge_that_tiles_from_one_that_does_not():
    tiles = periodic_texture(4, 64, 96)
    seamless = wrap_seam(tiles, draws=100)
    assert seamless.elsewhere_low < seamless.score < seamless.elsewhere_high
    assert seamless.score == pytest.approx(1.0, abs=0.08) and len(seamless.per_image) == 4
    ramp = torch.linspace(0, 60, 96, dtype=torch.float64)  # brighter to the right: a jump at the wrap edge
    broken = wrap_seam(tiles + ramp, draws=100)
    assert broken.score > 1.5 and broken.score > broken.elsewhere_high
    assert broken.elsewhere_median == pytest.approx(seamless.elsewhere_median, abs=0.1)  # lines elsewhere: as before

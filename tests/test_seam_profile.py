"""seam_profile (per-column/row sums) gives seam_score's numbers at every offset, fast enough for 1024²."""

import time

import pytest
import torch

from patchdiffusion.eval.errors import EvalError
from patchdiffusion.eval.seam import seam_profile, seam_score


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

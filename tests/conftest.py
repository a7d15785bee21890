"""Fixtures shared by several test files."""

import pytest
import torch


@pytest.fixture
def tiny_vae(tmp_path):
    """A tiny randomly initialised diffusers AutoencoderKL (factor 2, 4 latent channels), saved to a folder."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4, sample_size=16,
    )
    path = tmp_path / "vae"
    vae.save_pretrained(path)
    return path


def batch_of(images, labels=None, index=None, plan=None):
    """A TrainBatch for calling a method's loss directly (index: 0..B-1 unless given)."""
    import torch

    from patchdiffusion.methods.base import StepPlan, TrainBatch

    index = torch.arange(len(images)) if index is None else index
    return TrainBatch(images, labels, index, plan or StepPlan())

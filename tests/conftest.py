"""Fixtures shared by several test files."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Many small ops: one thread is fastest on a busy machine, and keeps conv results reproducible."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


# Tiny networks of every method (CPU, a few milliseconds a call), for tests that cover all methods.
TINY_METHODS = {
    "full": ["model.net.model_channels=8", "model.net.channel_mult=[1,2]", "model.net.num_res_blocks=1",
             "model.net.attention_resolutions=[]"],
    "patching": ["model.net.model_channels=8", "model.net.channel_mult=[1,2]", "model.net.num_res_blocks=1",
                 "model.net.attention_resolutions=[]", "model.net.patch_size=2"],
    "patch_diffusion": ["model.net.model_channels=8", "model.net.channel_mult=[1,2]", "model.net.num_res_blocks=1",
                        "model.net.attention_resolutions=[]"],
    "patch_ddpm": ["model.net.dim=8", "model.net.dim_mults=[1,2]", "model.net.attn_heads=1",
                   "model.net.attn_dim_head=8", "model.patch_divider=2"],
    "patch_dm": ["model.net.patch_size=8", "model.net.model_channels=8", "model.net.channel_mult=[1,2]",
                 "model.net.num_res_blocks=1", "model.net.attention_resolutions=[]", "model.net.code_dim=4",
                 "model.patch_batch=16"],
    "dimr": ["model.net.stages=[{block: transformer, dim: 16, hidden_dim: 32, num_blocks: 1, heads: 2, patch_size: 4},"
             " {block: convnext, dim: 8, hidden_dim: 16, num_blocks: 1, kernel_size: 3}]", "model.net.num_classes=0"],
}


def tiny_config(method: str, resolution: int | str = 16, *extra: str):
    """A RunConfig of `method` with its tiny network (TINY_METHODS) at `resolution`."""
    from patchdiffusion.config import RunConfig, apply_overrides

    config = apply_overrides(RunConfig(), [f"method={method}"])
    return apply_overrides(config, TINY_METHODS[method] + [f"data.resolution={resolution}", *extra])


def tiny_method(method: str, resolution: int | str = 16, *extra: str, num_images: int = 4, seed: int = 0):
    """(Method, net) of a tiny model with random (not zero-initialised) output layers, in eval mode."""
    from patchdiffusion.methods import build_method

    config = tiny_config(method, resolution, *extra)
    built = build_method(config.method, config.model, config.data.resolution)
    built.bind_data(num_images)
    torch.manual_seed(seed)
    net = built.build_network()
    with torch.no_grad():  # zero-initialised output layers would make every denoiser output the same
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return built, net.eval()

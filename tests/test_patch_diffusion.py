"""Patch Diffusion (Wang et al. 2023): coordinates, patch-size schedule, net input, training, sampling, latents."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from patchdiffusion import run as runs
from patchdiffusion.config import ConfigError, RunConfig, apply_overrides
from patchdiffusion.diffusion.samplers import SAMPLERS
from patchdiffusion.methods import build_method
from patchdiffusion.methods.patch_diffusion import (
    PatchDiffusionConfig,
    batch_multiplier,
    coordinate_grid,
    crop,
    draw_patch_size,
    random_patches,
)
from patchdiffusion.rng import SampleRNG, mix_seed
from patchdiffusion.sample import load_run
from patchdiffusion.train import train
from test_train import TINY as TRAIN_TINY
from conftest import batch_of
from patchdiffusion.methods.patch_diffusion import PatchPlan

TINY = [
    "method=patch_diffusion",
    *TRAIN_TINY,
    "train.seed=1",  # its first steps draw patch sides 16, 8, 4, 16, 4, 16 (×1, ×2, ×4, ×1, ×4, ×1)
]
QUIET = dict(progress=False, log=lambda *a: None)


def tiny_config(*extra):
    config = apply_overrides(RunConfig(), TINY[:1])
    return apply_overrides(config, TINY[1:] + list(extra))


def tiny_method(resolution=64, **fields):
    return build_method("patch_diffusion", PatchDiffusionConfig(**fields), (resolution, resolution))


# -- coordinates ---------------------------------------------------------------------------------


def test_full_patch_coordinates_are_linspace():
    R = 64
    grid = coordinate_grid(R, R)
    line = torch.linspace(-1, 1, R)
    torch.testing.assert_close(grid[0], line.expand(R, R), atol=1e-6, rtol=0)  # x varies along columns
    torch.testing.assert_close(grid[1], line[:, None].expand(R, R), atol=1e-6, rtol=0)  # y along rows


def test_patch_coordinates_are_the_crop_of_the_full_grid():
    R, p, B = 64, 16, 8
    images = torch.randn(B, 3, R, R)
    rng = SampleRNG([mix_seed(5, k) for k in range(B)])
    patches, coords = random_patches(images, p, rng)
    assert patches.shape == (B, 3, p, p) and coords.shape == (B, 2, p, p)
    full = coordinate_grid(R, R)
    corners = set()
    for b in range(B):
        # find the corner from the coordinates themselves, then compare both crops with plain slicing
        j = round((coords[b, 0, 0, 0].item() / 2 + 0.5) * (R - 1))
        i = round((coords[b, 1, 0, 0].item() / 2 + 0.5) * (R - 1))
        corners.add((i, j))
        assert torch.equal(coords[b], full[:, i:i + p, j:j + p])
        assert torch.equal(patches[b], images[b, :, i:i + p, j:j + p])
    assert len(corners) > 1, "every patch has its own corner"
    assert coords.min() >= -1 and coords.max() <= 1


def test_crop_matches_slicing():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    out = crop(x, torch.tensor([1, 4]), torch.tensor([2, 0]), 4)
    assert torch.equal(out[0], x[0, :, 1:5, 2:6]) and torch.equal(out[1], x[1, :, 4:8, 0:4])


# -- patch-size schedule -------------------------------------------------------------------------


def _frequencies(method, draws=10_000):
    counts = {}
    for s in range(draws):
        plan = method.plan_step(mix_seed(0, 4, s), 0.0)
        counts[plan.patch_size] = counts.get(plan.patch_size, 0) + 1
        assert plan.multiplier == batch_multiplier(plan.patch_size, method.canvas_side)
    return {k: v / draws for k, v in counts.items()}


def test_pixel_patch_size_frequencies_and_multipliers():
    method = tiny_method(64, real_p=0.5)
    freq = _frequencies(method)
    print("pixel frequencies", freq)
    for size, expected in {16: 0.2, 32: 0.3, 64: 0.5}.items():
        assert abs(freq[size] - expected) < 0.02
    assert [batch_multiplier(s, 64) for s in (16, 32, 64)] == [4, 2, 1]
    # 0.2·4 + 0.3·2 + 0.5·1 = 1.9, the reference's batch_mul_avg (its comment says "2")
    assert method.average_multiplier == pytest.approx(1.9)


def test_latent_patch_size_frequencies_and_multipliers(tmp_path):
    vae_dir = tmp_path / "vae"
    vae_dir.mkdir()
    (vae_dir / "config.json").write_text(json.dumps(
        {"latent_channels": 4, "block_out_channels": [8, 8, 8, 8], "scaling_factor": 0.18215}
    ))
    net = dict(in_channels=4, out_channels=4, extra_in_channels=2, model_channels=16, channel_mult=(1, 2))
    from patchdiffusion.nets.unet import UNetConfig

    method = tiny_method(256, real_p=0.3, latent=True, vae_path=str(vae_dir), net=UNetConfig(**net))
    assert method.canvas_side == 32 and method.patch_sizes == [16, 32]
    freq = _frequencies(method)
    print("latent frequencies", freq)
    assert abs(freq[16] - 0.7) < 0.02 and abs(freq[32] - 0.3) < 0.02
    assert [batch_multiplier(s, 32) for s in (16, 32)] == [2, 1]
    assert method.average_multiplier == pytest.approx(0.7 * 2 + 0.3)


def test_progressive_schedule_goes_from_small_to_full():
    sizes, probs = [16, 32, 64], [0.2, 0.3, 0.5]
    got = [draw_patch_size(sizes, probs, 0, t, progressive=True) for t in (0.0, 0.19, 0.21, 0.49, 0.51, 0.99)]
    assert got == [16, 16, 32, 32, 64, 64]


def test_bad_configs_are_refused():
    with pytest.raises(ConfigError, match="extra_in_channels"):
        from patchdiffusion.nets.unet import UNetConfig

        tiny_method(64, net=UNetConfig(extra_in_channels=0))
    with pytest.raises(ConfigError, match="real_p"):
        tiny_method(64, real_p=1.5)


# -- network input -------------------------------------------------------------------------------


class Recorder(torch.nn.Module):
    """A fake backbone that records what it is given and predicts zeros."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.calls = []

    def forward(self, x, noise_labels, class_labels=None, embedding=None, extra_channels=None):
        self.calls.append((x.detach().clone(), extra_channels.detach().clone()))
        return x * self.w


def test_network_input_has_coordinates_unscaled():
    method = tiny_method(32)
    net = method.build_network()
    assert net.input_conv.in_channels == 3 + 2
    rec = Recorder()
    x = torch.randn(2, 3, 32, 32) * 10
    method.denoiser(rec)(x, torch.tensor([10.0, 10.0]))
    x_in, coords = rec.calls[0]
    assert torch.equal(coords, coordinate_grid(32, 32).expand(2, -1, -1, -1))  # not multiplied by c_in
    torch.testing.assert_close(x_in, x / (10.0**2 + 0.25) ** 0.5)  # the image channels are
    # training: the coordinates given to the net are the crop's, unscaled, and the output has C channels
    images = torch.rand(8, 3, 32, 32) * 2 - 1
    rng = SampleRNG([mix_seed(1, k) for k in range(8)])
    loss = method.loss(rec, batch_of(images, plan=PatchPlan(patch_size=8)), rng)
    assert loss.shape == (8,)
    x_in, coords = rec.calls[1]
    assert x_in.shape == (8, 3, 8, 8) and coords.shape == (8, 2, 8, 8)
    assert coords.min() >= -1 and coords.max() <= 1 and coords[:, 0].unique().numel() > 8
    out = net(torch.randn(2, 3, 8, 8), torch.zeros(2), extra_channels=coords[:2])
    assert out.shape == (2, 3, 8, 8)


# -- training and sampling -----------------------------------------------------------------------


def test_training_runs_counts_images_and_samples_with_every_sampler(tmp_path):
    result = train(tiny_config("train.steps=4"), tmp_path, **QUIET)
    assert torch.isfinite(torch.tensor(result.last_loss))
    assert result.images_seen == round(4 * 4 * 1.9)  # batch × average multiplier per step
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in runs.read_metrics(tmp_path))
    loaded = load_run(tmp_path)
    for name in SAMPLERS:
        rng = SampleRNG([mix_seed(3, i) for i in range(2)])
        images = loaded.method.sample(loaded.net, rng, sampler=name, steps=3)
        assert images.shape == (2, 3, 16, 16), name
        assert torch.isfinite(images).all() and images.abs().max() <= 1


def test_exact_resume(tmp_path):
    """Steps of different patch sizes and multipliers resume bit for bit (data position included)."""
    from test_train import assert_same, weights

    train(tiny_config("train.steps=6"), tmp_path / "one", **QUIET)
    train(tiny_config("train.steps=3"), tmp_path / "split", **QUIET)
    train(tiny_config("train.steps=6"), tmp_path / "split", resume=True, **QUIET)
    assert_same(weights(tmp_path / "one", "net"), weights(tmp_path / "split", "net"))
    assert_same(weights(tmp_path / "one", "ema"), weights(tmp_path / "split", "ema"))
    a = runs.load_train_state(runs.latest_checkpoint(tmp_path / "one"))
    b = runs.load_train_state(runs.latest_checkpoint(tmp_path / "split"))
    assert a["data_position"] == b["data_position"] == 4 * (1 + 2 + 4 + 1 + 4 + 1)  # small patches were drawn
    assert a["images_seen"] == b["images_seen"] == round(6 * 4 * 1.9)


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")
def test_ddp_two_processes_match_one(tmp_path):
    """Every process draws the step's patch size alike and takes its share of the B·m patches."""
    from test_train import assert_same, weights

    args = TINY[1:] + ["train.steps=3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cli = ["-m", "patchdiffusion.cli", "train", "--no-progress", "--method", "patch_diffusion"]
    subprocess.run([sys.executable] + cli + ["--run", str(tmp_path / "one")] + args, check=True, env=env,
                   capture_output=True)
    torchrun = ["torchrun", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(torchrun + cli + ["--run-dir", str(tmp_path / "two")] + args, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same(weights(tmp_path / "one", "net"), weights(tmp_path / "two", "net"), atol=1e-5)
    assert_same(weights(tmp_path / "one", "ema"), weights(tmp_path / "two", "ema"), atol=1e-5)


def test_cli_train_then_sample(tmp_path):
    from patchdiffusion.cli import main

    run = tmp_path / "run"
    args = [a for a in TINY[1:]] + ["train.steps=2"]
    assert main(["train", "--method", "patch_diffusion", "--real_p", "0.5", "--run", str(run), "--no-progress"] + args) == 0
    assert (run / "config.yaml").is_file()
    out = tmp_path / "gen"
    assert main(["sample", "--run", str(run), "--num", "2", "--steps", "3", "--S_churn", "5", "--out", str(out),
                 "--no-progress"]) == 0
    from PIL import Image

    assert Image.open(out / "000000.png").size == (16, 16)


# -- latent space --------------------------------------------------------------------------------


def test_latent_round_trip_and_cache(tiny_vae, tmp_path):
    from patchdiffusion.latent import LatentCodec

    codec = LatentCodec(tiny_vae, cache_dir=tmp_path / "cache")
    assert codec.scaling_factor == pytest.approx(0.18215) and codec.info.downsample == 2
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    z = codec.encode(images)
    assert z.shape == (3, 4, 8, 8)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 3 and codec.cache_hits == 0
    z_again = codec.encode(images)
    assert codec.cache_hits == 3 and torch.equal(z, z_again)
    uncached = LatentCodec(tiny_vae).encode(images)
    torch.testing.assert_close(z, uncached)
    # ×scale then ÷scale: decoding the scaled latent equals decoding the raw mean with the VAE itself
    decoded = codec.decode(z)
    direct = codec.vae.decode(codec.vae.encode(images).latent_dist.mean).sample
    assert decoded.shape == images.shape
    torch.testing.assert_close(decoded, direct, atol=1e-5, rtol=1e-4)


def test_latent_training_and_sampling(tiny_vae, tmp_path):
    config = tiny_config(
        "train.steps=2", "model.latent=true", f"model.vae_path={tiny_vae}", f"model.latent_cache={tmp_path / 'c'}",
        "model.net.in_channels=4", "model.net.out_channels=4", "model.net.channel_mult=[1]",
        "model.net.attention_resolutions=[]",
    )
    result = train(config, tmp_path / "run", **QUIET)
    assert torch.isfinite(torch.tensor(result.last_loss))
    assert any((tmp_path / "c").glob("*.safetensors"))
    loaded = load_run(tmp_path / "run")
    rng = SampleRNG([mix_seed(3, i) for i in range(2)])
    images = loaded.method.sample(loaded.net, rng, steps=3)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()


def test_cli_latents_and_vae_flags(tiny_vae, tmp_path):
    from patchdiffusion.cli import main

    run = tmp_path / "run"
    args = [a for a in TINY if not a.startswith("method=")]
    code = main(["train", "--method", "patch_diffusion", "--latents", "--vae", str(tiny_vae), "--run", str(run),
                 "--steps", "1", "--no-progress", *args, "model.net.in_channels=4", "model.net.out_channels=4",
                 "model.net.channel_mult=[1]", "model.net.attention_resolutions=[]"])
    assert code == 0
    saved = load_run(run).config.model
    assert saved.latent is True and saved.vae_path == str(tiny_vae)

"""Patch-based DDPM (`--method patch_ddpm`) against METHODS.md §2's faithfulness tests."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from patchdiffusion import cli
from patchdiffusion.config import ConfigError, RunConfig, apply_overrides
from patchdiffusion.diffusion.schedules import VPSchedule
from patchdiffusion.methods import build_method
from patchdiffusion.methods.patch_ddpm import merge_patches, position_one_hot, split_patches
from patchdiffusion.methods.patch_ddpm.seed_config import load_seed_config
from patchdiffusion.rng import SampleRNG
from test_train import TINY
from conftest import batch_of

SMALL_NET = ["model.net.dim=16", "model.net.dim_mults=[1,2]", "model.net.attn_heads=2", "model.net.attn_dim_head=8"]
TRAIN = [o for o in TINY if not o.startswith("model.")]  # the training tests' tiny run, our own net


def make(resolution=16, divider=2, *extra):
    config = apply_overrides(
        RunConfig(), ["method=patch_ddpm", f"data.resolution={resolution}", f"patch_divider={divider}", *SMALL_NET,
                      *extra]
    )
    method = build_method("patch_ddpm", config.model, config.data.resolution)
    torch.manual_seed(0)
    return method, method.build_network().eval()


@pytest.mark.parametrize("divider", [1, 2, 4, 8])
def test_split_merge_is_exact(divider):
    x = torch.randn(3, 3, 32, 48)
    patches = split_patches(x, divider)
    assert patches.shape == (divider**2 * 3, 3, 32 // divider, 48 // divider)
    assert torch.equal(merge_patches(patches, divider, 3), x)
    # Patch-major: row k·B + b is cell k = i·D + j of image b.
    p, q = 32 // divider, 48 // divider
    k = divider**2 - 1
    i, j = divmod(k, divider)
    assert torch.equal(patches[k * 3 + 1], x[1, :, i * p:(i + 1) * p, j * q:(j + 1) * q])
    # A chunk of cells equals the same rows of the full split.
    cells = range(k // 2, k + 1)
    assert torch.equal(split_patches(x, divider, cells), patches[cells.start * 3:(cells.stop) * 3])


def test_one_hot_positions_are_patch_major():
    one_hot = position_one_hot(range(4), 2, batch=3)  # (4·3, 4)
    assert one_hot.shape == (12, 4)
    assert torch.equal(one_hot.argmax(1), torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]))
    assert torch.equal(one_hot.sum(1), torch.ones(12))
    # Cell (i, j) = (2, 1) of a 4×4 grid is index 2·4 + 1 = 9.
    assert position_one_hot(range(9, 10), 4, batch=1)[0].nonzero().flatten().tolist() == [9]


def test_encoder_input_shape_gcc_and_tiled_time():
    """(B, 3, 128, 128) at D = 4 gives D²·B patches of (6, 32, 32) and an output of (B, 3, 128, 128);
    channels 3..5 of every patch are avg_pool(x_t, kernel D); t is tiled, not interleaved."""
    method, net = make(128, 4)
    seen = {}
    net.unet.init_conv.register_forward_pre_hook(lambda module, args: seen.update(input=args[0].shape))
    x, t = torch.randn(2, 3, 128, 128), torch.tensor([7.0, 900.0])
    with torch.no_grad():
        out = net(x, t)
    assert seen["input"] == (32, 6, 32, 32) and out.shape == (2, 3, 128, 128)
    patches, time, position, content = net.patch_inputs(x, t, range(16))
    assert torch.equal(content, F.avg_pool2d(x, kernel_size=4).repeat(16, 1, 1, 1))
    assert torch.equal(time, t.repeat(16)) and time[:4].tolist() == [7.0, 900.0, 7.0, 900.0]
    assert position.shape == (32, 16)
    assert net.unet.embed.out_dim == 4 * 16  # 4·dim


def test_chunked_network_equals_one_call():
    _, net = make(32, 4)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3.0, 600.0])
    with torch.no_grad():
        whole = net(x, t)
        for k in (1, 3, 16):
            torch.testing.assert_close(net(x, t, patch_batch=k), whole, atol=1e-5, rtol=0)


def test_position_changes_only_that_patch_and_gcc_couples_all():
    _, net = make(16, 2)
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([400.0])
    with torch.no_grad():
        patches, time, position, content = net.patch_inputs(x, t, range(4))
        base = net.unet(patches, time, position, content)
        swapped = position.clone()
        swapped[[0, 1]] = swapped[[1, 0]]  # patches 0 and 1 trade positions
        out = net.unet(patches, time, swapped, content)
        diff = (out - base).flatten(1).abs().amax(1)
        assert diff[0] > 1e-4 and diff[1] > 1e-4 and diff[2:].max() == 0
        # Changing x_t in one corner changes every patch's output through the pooled global content ...
        y = x.clone()
        y[:, :, 0, 0] += 1.0
        diff = merge_patches((net(y, t) - net(x, t)).abs(), 1, 1)
        per_cell = split_patches(diff, 2).flatten(1).amax(1)
        assert per_cell.min() > 1e-5
    # ... and, without GCC, only the patch holding that pixel.
    _, plain = make(16, 2, "model.gcc=false")
    with torch.no_grad():
        per_cell = split_patches((plain(y, t) - plain(x, t)).abs(), 2).flatten(1).amax(1)
    assert per_cell[0] > 1e-5 and per_cell[1:].max() == 0


def test_ablation_switches():
    _, no_gcc = make(16, 2, "model.gcc=false")
    assert no_gcc.unet.init_conv.in_channels == 3
    _, no_pos = make(16, 2, "model.position=false")
    assert no_pos.unet.embed.position_mlp is None
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1.0, 2.0])
    _, _, position, _ = no_pos.patch_inputs(x, t, range(4))
    assert position is None and no_pos(x, t).shape == x.shape
    _, full = make(16, 2)
    assert full.unet.init_conv.in_channels == 6 and full.unet.embed.fuse.in_features == 2 * 16


def test_schedule_and_l1_eps_loss():
    method, net = make(16, 2)
    betas = method.schedule.betas
    assert method.config.schedule == "cosine" and float(betas.max()) <= 0.999
    assert float(method.schedule.alphas_cumprod[-1]) < 1e-4
    torch.testing.assert_close(betas, VPSchedule.cosine(1000, s=0.008).betas)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    loss = method.loss(net, batch_of(images), SampleRNG([4, 5]))
    # The same draws by hand: t per image, noise per image, L1 between ε̂ of the whole canvas and ε.
    rng = SampleRNG([4, 5])
    t = rng.randint(0, 1000).reshape(2)
    noise = rng.randn_like(images)
    ab = method.schedule.alphas_cumprod[t].float().view(2, 1, 1, 1)
    x_t = ab.sqrt() * images + (1 - ab).sqrt() * noise
    expected = (net(x_t, t.float()) - noise).abs().flatten(1).mean(1)
    torch.testing.assert_close(loss, expected)
    assert method.default_sampler == "ddpm" and method.default_steps == 1000 and method.clip_denoised


def test_sampling_seeds_and_patch_batch_do_not_change_images():
    method, net = make(16, 2)
    a = method.sample(net, SampleRNG([5, 6]), steps=8)
    b = method.sample(net, SampleRNG([6]), steps=8, options={"patch_batch": 1})
    assert a.shape == (2, 3, 16, 16) and torch.isfinite(a).all()
    torch.testing.assert_close(a[1:], b, atol=1e-4, rtol=0)
    ddim = method.sample(net, SampleRNG([5]), steps=8, sampler="ddim", options={"patch_batch": 3})
    assert ddim.shape == (1, 3, 16, 16)


def test_clear_errors():
    with pytest.raises(ConfigError, match="not divisible by patch_divider 3"):
        make(16, 3)
    with pytest.raises(ConfigError, match="not divisible by 2"):
        make(8, 8)  # 1-pixel patches cannot be downsampled once
    method, net = make(16, 2)
    with pytest.raises(ConfigError, match="patch_batch must be 0"):
        method.sample(net, SampleRNG([1]), steps=2, options={"patch_batch": -1})
    with pytest.raises(ConfigError, match="no sampling option 'patch_bach' \\(did you mean 'patch_batch'"):
        method.sample(net, SampleRNG([1]), steps=2, options={"patch_bach": 2})


def test_cli_train_and_sample(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--method", "patch_ddpm", "--patch_divider", "4", "--run", str(run), "--no-progress",
            "train.steps=2", *TRAIN, *SMALL_NET, "data.resolution=16", "model.net.dim_mults=[1]"]
    assert cli.main(args) == 0
    out = tmp_path / "images"
    assert cli.main(["sample", "--run", str(run), "--num", "2", "--steps", "4", "--patch-batch", "3",
                     "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    assert len(list(out.glob("0*.png"))) == 2 and (out / "grid.png").is_file()


def test_reference_json_config(tmp_path, capsys):
    reference = load_seed_config("configs/patch_ddpm/config_patch_divider=4.json")[0]
    assert reference.method == "patch_ddpm" and reference.model.patch_divider == 4
    assert reference.model.net.dim == 128 and reference.model.net.dim_mults == (1, 2, 4, 8)
    assert reference.data.resolution == (128, 128) and reference.train.lr == 1e-4 and reference.train.batch_size == 32
    # 0.995 every 10 steps of 32 images: a half-life of 10·ln ½/ln 0.995 steps = 44.25k images.
    assert math.isclose(reference.train.ema_halflife_kimg, 10 * math.log(0.5) / math.log(0.995) * 32 / 1000)

    run = tmp_path / "from_json"
    config = {
        "trainer": {"train_dataset_dir": "builtin:textures?count=16", "log_dir": str(run), "train_batch_size": 4,
                    "train_num_steps": 2, "save_and_sample_every": 100, "wandb_enabled": False},
        "model": {"dim": 16, "dim_mults": [1], "patch_divider": 2, "image_size": 16},
        "diffusion": {"loss_type": "l1"},
    }
    path = tmp_path / "config_patch_divider=2.json"
    path.write_text(json.dumps(config))
    assert cli.main(["train", "--config", str(path), "--no-progress", "train.device=cpu", "sample_images=0"]) == 0
    assert (run / "config.yaml").is_file()
    assert cli.main(["sample", "--run", str(run), "--num", "1", "--steps", "3", "--out", str(tmp_path / "s"),
                     "--device", "cpu", "--no-progress"]) == 0
    config["model"]["dimm"] = 8
    path.write_text(json.dumps(config))
    assert cli.main(["train", "--config", str(path), "--no-progress"]) == 2
    assert "unknown key 'model.dimm'" in capsys.readouterr().err

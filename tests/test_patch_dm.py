"""Patch-DM (`--method patch_dm`) against METHODS.md §1 and issue 7's acceptance points."""

import numpy as np
import pytest
import torch

from patchdiffusion import run as runs
from patchdiffusion.methods.patch_dm.codes import LatentCodeConfig, MLPSkipNet, code_frechet_report, load_codes, train_code_model
from patchdiffusion.config import ConfigError, RunConfig, apply_overrides
from patchdiffusion.methods import build_method
from patchdiffusion.nets.collage import CollageUNet, collage, cut_grid, join_grid
from patchdiffusion.rng import SampleRNG
from patchdiffusion.train import train
from conftest import batch_of

TINY_NET = [
    "method=patch_dm", "model.net.patch_size=16", "model.net.model_channels=8", "model.net.channel_mult=[1,2]",
    "model.net.num_res_blocks=1", "model.net.attention_resolutions=[8]", "model.net.code_dim=8",
]


def make(*extra, resolution=32, num_images=6):
    config = apply_overrides(RunConfig(), TINY_NET + [f"data.resolution={resolution}", *extra])
    method = build_method("patch_dm", config.model, config.data.resolution)
    method.bind_data(num_images)
    torch.manual_seed(0)
    net = method.build_network()
    with torch.no_grad():  # zero-initialised output layers would hide every dependency
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return method, net.eval()


def tiny_clip(path, image_size=32, projection_dim=8):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(1)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=image_size, patch_size=8, projection_dim=projection_dim)
    model = CLIPVisionModelWithProjection(config).eval()
    model.save_pretrained(str(path))
    return model


# ------------------------------------------------------------------------------------------------
# the collage (faithfulness test 1)


def test_collage_shapes_and_offset():
    """B·P1·P2 patches -> B·(P1−1)(P2−1) windows, equal to the reassembled grid sliced at h/2."""
    B, P1, P2, C, h = 2, 3, 4, 5, 8
    feats = torch.randn(B * P1 * P2, C, h, h)
    out = collage(feats, P1, P2)
    assert out.shape == (B * (P1 - 1) * (P2 - 1), C, h, h)
    grid = join_grid(feats, P1, P2)  # (B, C, P1·h, P2·h)
    expected = cut_grid(grid[:, :, h // 2: -h // 2, h // 2: -h // 2], P1 - 1, P2 - 1)
    assert torch.equal(out, expected)
    # window (0, 0) of image 0: its top-left quadrant is the bottom-right quadrant of patch (0, 0)
    assert torch.equal(out[0, :, : h // 2, : h // 2], feats[0, :, h // 2:, h // 2:])
    assert torch.equal(out[0, :, h // 2:, h // 2:], feats[P2 + 1, :, : h // 2, : h // 2])


def test_every_skip_level_is_collaged():
    method, net = make()
    x = torch.randn(2 * 3 * 3, 3, 16, 16)
    emb = net.embed(torch.zeros(18), torch.zeros(18, 2), None)
    encoded = net.encode(x, emb, torch.zeros(18, 8))
    shifted = net.collage_encoded(encoded, 3, 3)
    assert shifted.h.shape[0] == 2 * 2 * 2
    for before, after in zip(encoded.skips, shifted.skips):
        assert after.shape == (8,) + before.shape[1:]


@pytest.mark.parametrize("use_collage", [True, False])
def test_neighbour_dependence(use_collage):
    """Collage on: a patch's x0 changes when only its neighbour's input changes; off: it does not."""
    method, net = make(f"model.collage={str(use_collage).lower()}")
    D = method.denoiser(net)
    x = torch.randn(1, 3, 48, 48)
    cond = dict(code=torch.randn(1, 8), position_keep=torch.ones(1))
    sigma = torch.tensor([2.0])
    with torch.no_grad():
        a = D(x, sigma, **cond)
        y = x.clone()
        y[:, :, 16:32, 16:32] += 1.0  # only the centre patch changes
        b = D(y, sigma, **cond)
    centre = (a - b)[:, :, 16:32, 16:32].abs().max()
    right = (a - b)[:, :, 16:32, 32:48].abs().max()
    assert centre > 1e-3
    if use_collage:
        assert right > 1e-4
    else:
        assert right == 0


# ------------------------------------------------------------------------------------------------
# positions, loss, guidance (faithfulness tests 2, 3, 4, 6)


def test_positions_integer_in_encoder_and_half_in_decoder(monkeypatch):
    method, net = make()
    seen = []
    original = CollageUNet.embed

    def spy(self, t, positions, keep):
        seen.append(positions.clone())
        return original(self, t, positions, keep)

    monkeypatch.setattr(CollageUNet, "embed", spy)
    with torch.no_grad():
        method.denoiser(net)(torch.randn(1, 3, 32, 48), torch.tensor([1.0]), code=torch.zeros(1, 8),
                             position_keep=torch.ones(1))
    encoder, decoder = seen[0], seen[1]
    assert torch.equal(encoder, encoder.round()) and encoder[:, 0].max() == 3 and encoder[:, 1].max() == 2
    assert torch.equal(decoder - 0.5, (decoder - 0.5).round()) and decoder.shape[0] == 2 * 3


def test_sampled_canvas_size_and_error():
    method, net = make()
    out = method.sample(net, SampleRNG([0]), 32, 48, steps=2)
    assert out.shape == (1, 3, 32, 48)
    with pytest.raises(ConfigError, match="multiple of the patch size"):
        method.sample(net, SampleRNG([0]), 32, 40, steps=2)


def test_loss_terms_centre_crop_and_pad_mask(monkeypatch):
    """Shifted target = centre p×p of the 2p×2p noise window; unshifted term masked to the image; the
    pad of x_t is 0."""
    method, net = make("model.code_dropout=0", "model.position_dropout=0")
    captured = {}

    def fake_forward(patches, t, positions, grid, mode, **cond):
        captured.update(patches=patches, positions=positions, grid=grid, mode=mode)
        n = patches.shape[0]
        return torch.zeros(n // 4, 3, 16, 16), torch.zeros(n, 3, 16, 16)

    images = torch.rand(2, 3, 32, 32) * 2 - 1
    rng_seeds = [5, 6]
    loss = method.loss(fake_forward, batch_of(images, index=torch.tensor([0, 1])), SampleRNG(rng_seeds))
    assert captured["mode"] == "both" and captured["grid"] == (2, 2)
    # Rebuild the draws: same order as the loss (t, noise, top, left).
    rng = SampleRNG(rng_seeds)
    rng.randint(0, 1000)
    noise = rng.randn(3, 48, 48)
    top, left = rng.randint(0, 2).reshape(2), rng.randint(0, 2).reshape(2)
    mask = torch.nn.functional.pad(torch.ones(1, 32, 32), (8, 8, 8, 8))
    for b in range(2):
        win = noise[b, :, top[b] * 16: top[b] * 16 + 32, left[b] * 16: left[b] * 16 + 32]
        m = mask[:, top[b] * 16: top[b] * 16 + 32, left[b] * 16: left[b] * 16 + 32]
        expected_a = win[:, 8:24, 8:24].square().mean()
        expected_b = (win.square() * m).sum() / (m.sum() * 3)
        assert torch.isclose(loss[b], expected_a + expected_b, rtol=1e-5)
        x_w = captured["patches"][b * 4:(b + 1) * 4]
        pad_cells = cut_grid((1 - m)[None].expand(1, 3, -1, -1), 2, 2)
        assert pad_cells.sum() > 0 and torch.all(x_w[pad_cells.bool()] == 0)


def test_guidance_combines_as_the_paper():
    """w = 0.5: 1.5·cond − 0.5·uncond (uncond: code and position zeroed); scale 1 (w = 0) is cond alone."""
    method, net = make()
    D = method.denoiser(net)
    x, sigma = torch.randn(1, 3, 32, 32), torch.tensor([3.0])
    code, keep = torch.randn(1, 8), torch.ones(1)
    with torch.no_grad():
        cond = D(x, sigma, code=code, position_keep=keep)
        uncond = D(x, sigma, code=torch.zeros_like(code), position_keep=torch.zeros(1))
        guided = method.guided(D, 1.5)(x, sigma, code=code, position_keep=keep)
        plain = method.guided(D, 1.0)(x, sigma, code=code, position_keep=keep)
    assert torch.allclose(guided, 1.5 * cond - 0.5 * uncond, atol=1e-5)
    assert torch.equal(plain, cond)


# ------------------------------------------------------------------------------------------------
# codes: CLIP initialisation, table, latent model (faithfulness tests 5, 7)


def test_init_codes_equal_clip_embeddings(tmp_path):
    from patchdiffusion.cli import main
    from patchdiffusion.methods.patch_dm.codes import clip_processor
    from patchdiffusion.data import open_source

    model = tiny_clip(tmp_path / "clip")
    out = tmp_path / "codes.safetensors"
    assert main(["patchdm", "init-codes", "--data", "builtin:textures?count=5", "--clip", str(tmp_path / "clip"),
                 "--out", str(out), "--resolution", "32", "--batch", "2", "--no-progress"]) == 0
    codes = load_codes(out)
    assert codes.shape == (5, 8)
    source = open_source("builtin:textures?count=5", resolution=(32, 32))
    processor = clip_processor(tmp_path / "clip", 32)
    pixels = processor(images=[source.read(i) for i in range(5)], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = model(pixel_values=pixels).image_embeds
    torch.testing.assert_close(codes, expected, atol=1e-5, rtol=1e-5)


def test_code_table_from_codes_file_is_trained(tmp_path):
    """Table = images × code dim, starts at the codes file (cosine 1) and moves with training."""
    from safetensors.torch import save_file

    codes = torch.randn(6, 8)
    save_file({"codes": codes}, str(tmp_path / "codes.safetensors"))
    config = apply_overrides(RunConfig(), TINY_NET + [
        "data.source=builtin:textures?count=6", "data.resolution=32", f"model.codes_path={tmp_path / 'codes.safetensors'}",
        "model.code_dropout=0", "train.batch_size=4", "train.steps=3", "train.warmup_steps=0", "train.lr=1e-2",
        "train.sample_images=0", "train.device=cpu", "train.ema_halflife_kimg=0",
    ])
    method = build_method("patch_dm", config.model, config.data.resolution)
    method.bind_data(6)
    assert torch.equal(method.build_network().codes.weight.detach(), codes)
    train(config, tmp_path / "run", progress=False, log=lambda *a: None)
    trained = runs.load_weights(runs.latest_checkpoint(tmp_path / "run"), "net")["codes.weight"]
    assert trained.shape == (6, 8)
    assert not torch.equal(trained, codes)
    cosine = torch.nn.functional.cosine_similarity(trained, codes, dim=1)
    assert cosine.min() > 0.5  # moved, but still the CLIP-initialised codes
    config.model.net.num_codes = 0  # as a new run would have it
    with pytest.raises(ConfigError, match="shape"):
        build_method("patch_dm", config.model, config.data.resolution).bind_data(7)


def test_latent_mlp_layout():
    config = LatentCodeConfig(hidden=32, num_layers=10)
    net = MLPSkipNet(16, config)
    assert net.linears[0].in_features == 16
    assert all(layer.in_features == 32 + 16 for layer in net.linears[1:])  # the code again before layers 1..9
    assert net.linears[-1].out_features == 16 and len(net.norms) == 9
    assert net(torch.randn(3, 16), torch.tensor([1.0, 5.0, 900.0])).shape == (3, 16)
    from patchdiffusion.diffusion.schedules import schedule_from_name

    betas = schedule_from_name(config.schedule, config.timesteps).betas
    assert torch.allclose(betas, torch.full((1000,), 0.008, dtype=torch.float64))


def test_latent_code_model_matches_the_table():
    """A short fit brings sampled codes far closer (Fréchet) to the table than Gaussian noise is."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 6, generator=g) * 2
    table = centres[torch.arange(64) % 4] + 0.2 * torch.randn(64, 6, generator=g)
    config = LatentCodeConfig(hidden=64, num_layers=4, steps=300, batch_size=64, lr=2e-3, sample_steps=20)
    model, losses = train_code_model(table, config, log=None)
    assert np.mean(losses[-30:]) < np.mean(losses[:30])
    sampled = model.sample(SampleRNG(list(range(128))))
    report = code_frechet_report(table, sampled)
    assert report["fd_sampled"] < 0.25 * report["fd_gaussian_noise"]


# ------------------------------------------------------------------------------------------------
# end to end: train, train-codes, sample with the CLI


def test_cli_train_codes_and_sample(tmp_path, capsys):
    from PIL import Image

    from patchdiffusion.cli import main

    run = tmp_path / "run"
    assert main(["train", "--method", "patch_dm", "--data", "builtin:textures?count=4", "--resolution", "32",
                 "--run", str(run), "--steps", "2", "--batch", "2", "--device", "cpu", "--no-progress",
                 *TINY_NET[1:], "train.sample_images=2", "sample.num_steps=2"]) == 0
    assert main(["train-codes", "--run", str(run), "--num-eval", "16", "--no-progress", "hidden=16",
                 "num_layers=3", "steps=5", "batch_size=8", "sample_steps=3"]) == 0
    assert (run / "codes_model" / "report.json").is_file()
    out = tmp_path / "out"
    assert main(["sample", "--run", str(run), "--size", "64x32", "--num", "1", "--steps", "2", "--out", str(out),
                 "--no-progress"]) == 0
    assert Image.open(out / "000000.png").size == (64, 32)
    assert main(["sample", "--run", str(run), "--size", "48x32", "--num", "1", "--steps", "2", "--out",
                 str(tmp_path / "reuse"), "--code-from", "3", "--canvas", "disk", "--no-progress"]) == 0
    assert Image.open(tmp_path / "reuse" / "000000.png").size == (48, 32)
    assert "sampling 1 canvas of 48x32 (2 ddim steps" in capsys.readouterr().out  # count and size announced
    assert main(["sample", "--run", str(run), "--size", "64x64", "--num", "1", "--steps", "3", "--out",
                 str(tmp_path / "moved"), "--grid", "random", "--positions", "none", "--no-progress"]) == 0
    assert Image.open(tmp_path / "moved" / "000000.png").size == (64, 64)
    assert main(["sample", "--run", str(run), "--size", "40x36", "--num", "1", "--steps", "2", "--out",
                 str(tmp_path / "odd"), "--no-progress"]) == 0  # tiles need not divide the canvas
    assert Image.open(tmp_path / "odd" / "000000.png").size == (40, 36)
    capsys.readouterr()
    assert main(["sample", "--run", str(run), "--size", "24x32", "--num", "1", "--out", str(out),
                 "--no-progress"]) == 2  # narrower than one tile: a clear error
    assert "smaller than the model's 32x32 tile" in capsys.readouterr().err


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_x0_from_each_prediction(prediction):
    """A net that outputs the exact target recovers x0 at any σ (the conversion sampling uses)."""
    method, _ = make(f"model.prediction={prediction}")
    x0, n = torch.rand(2, 3, 16, 16) * 2 - 1, torch.randn(2, 3, 16, 16)
    sigma = torch.tensor([0.3, 40.0]).view(2, 1, 1, 1)
    alpha = 1 / (1 + sigma**2).sqrt()
    a, s = alpha, alpha * sigma  # √ᾱ, √(1 − ᾱ)
    target = {"eps": n, "v": a * n - s * x0, "x0": x0}[prediction]
    torch.testing.assert_close(method.x0_from_output(x0 + sigma * n, sigma, target), x0, atol=1e-4, rtol=1e-4)

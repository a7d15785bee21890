"""Any size, for every method: tiles of the model's size fused into a denoiser over the whole canvas."""

import dataclasses

import pytest
import torch
from PIL import Image

from conftest import TINY_METHODS, tiny_config, tiny_method
from patchdiffusion.diffusion.tiled import TilingConfig
from patchdiffusion.errors import ConfigError
from patchdiffusion.rng import SampleRNG

SAMPLERS = {
    "euler": {}, "heun": {"S_churn": 5.0}, "ddim": {"eta": 0.5}, "ddpm": {}, "dpmpp_2m": {},
}


@pytest.mark.parametrize("name", list(TINY_METHODS))
def test_one_tile_covering_the_canvas_is_untiled_sampling_bit_for_bit(name):
    """For every method and sampler, the tiled path with one tile covering the canvas (the method's own
    tile model: coordinates, grid positions and global content, collage and code, class) gives exactly
    what sampling the canvas in one piece gives."""
    method, net = tiny_method(name)
    one_tile = TilingConfig(tile=method.native_tile, overlap=(0, 0), grid="fixed", batch=2)
    for sampler, options in SAMPLERS.items():
        whole = method.sample(net, SampleRNG([3, 4]), steps=3, sampler=sampler, sampler_options=options)
        tiled = method.sample(net, SampleRNG([3, 4]), steps=3, sampler=sampler, sampler_options=options,
                              tiling=one_tile)
        assert torch.equal(whole, tiled), (name, sampler, (whole - tiled).abs().max())


def test_one_tile_is_untiled_with_guidance_too():
    for name, extra in (("full", ["model.net.num_classes=3"]), ("patch_dm", [])):
        method, net = tiny_method(name, 16, *extra)
        labels = torch.tensor([0, 2]) if name == "full" else None
        one_tile = TilingConfig(tile=method.native_tile, overlap=(0, 0), batch=2)
        whole = method.sample(net, SampleRNG([1, 2]), steps=3, labels=labels, guidance=2.0)
        tiled = method.sample(net, SampleRNG([1, 2]), steps=3, labels=labels, guidance=2.0, tiling=one_tile)
        assert torch.equal(whole, tiled), name


@pytest.mark.parametrize("name", list(TINY_METHODS))
def test_every_method_samples_a_non_square_canvas_from_tiles(name, tmp_path):
    """96×160 from a model trained at 16², in memory and on disk (the same numbers), PNG and TIFF out."""
    from patchdiffusion.train import train
    from patchdiffusion.sample import generate_canvases

    run = tmp_path / "run"
    config = tiny_config(name, 16, "data.source=builtin:textures?count=4", "train.steps=1", "train.batch_size=2",
                         "train.sample_images=0", "train.device=cpu", "sample.num_steps=2")
    train(config, run, progress=False, log=lambda *a: None)
    lines = []
    memory = generate_canvases(run, tmp_path / "memory", height=96, width=160, storage="memory", progress=False,
                               log=lines.append)
    disk = generate_canvases(run, tmp_path / "disk", height=96, width=160, storage="disk", image_format="tiff",
                             progress=False, log=lines.append)
    import numpy as np
    import tifffile

    a = Image.open(memory[0])
    assert a.size == (160, 96)
    b = tifffile.imread(disk[0])
    assert b.shape == (96, 160, 3) and np.array_equal(b, np.asarray(a))  # memory/PNG == disk/TIFF
    assert any("storage disk" in line for line in lines)
    assert not list((tmp_path / "disk").glob(".job-*"))  # the job folder goes once the image is written


def test_latent_canvases_are_decoded_from_tiles(tiny_vae, tmp_path, monkeypatch):
    """A latent model's canvas is sampled in latent tiles and decoded tile by tile (tiled VAE decode)."""
    from patchdiffusion.sample import generate_canvases
    from patchdiffusion.train import train

    run = tmp_path / "run"
    config = tiny_config("patch_diffusion", 16, "data.source=builtin:textures?count=4", "train.steps=1",
                         "train.batch_size=2", "train.sample_images=0", "train.device=cpu", "sample.num_steps=2",
                         "model.latent=true", f"model.vae_path={tiny_vae}", "model.net.in_channels=4",
                         "model.net.out_channels=4")
    train(config, run, progress=False, log=lambda *a: None)
    paths = generate_canvases(run, tmp_path / "out", height=48, width=64, progress=False, log=lambda *a: None)
    assert Image.open(paths[0]).size == (64, 48)
    with pytest.raises(ConfigError, match="divisible by the VAE's factor 2"):
        generate_canvases(run, tmp_path / "bad", height=47, width=64, progress=False, log=lambda *a: None)
    # --wrap: the latent torus is decoded as a torus too (canvas.tiled_decode(wrap=True), tested there).
    import patchdiffusion.canvas as canvas

    decoded_as, real_decode = [], canvas.tiled_decode
    monkeypatch.setattr(canvas, "tiled_decode", lambda *a, **k: decoded_as.append(k.get("wrap")) or real_decode(*a, **k))
    paths = generate_canvases(run, tmp_path / "wrap", height=48, width=64, tiling=TilingConfig(wrap=True),
                              progress=False, log=lambda *a: None)
    assert decoded_as == [True] and Image.open(paths[0]).size == (64, 48)


def test_impossible_tilings_are_one_line_before_any_work(tmp_path):
    method, net = tiny_method("full")
    for tiling, message in [
        (TilingConfig(overlap=(16, 16)), "overlap must be in"),
        (TilingConfig(window="box"), "window must be one of"),
        (TilingConfig(tile=(64, 64)), "smaller than the model's 64x64 tile"),
    ]:
        with pytest.raises(ConfigError, match=message):
            method.sample(net, SampleRNG([0]), 32, 48, steps=2, tiling=tiling)


def test_wrapped_canvas_tiles_with_itself():
    """With wrap the canvas is a torus: no place on it is an edge. The tiled denoiser of a model without
    positions commutes with rolling the canvas by a whole stride (the tiles only change names), the
    wrap edge included; without wrap the edge tiles are cut off and it does not."""
    method, net = tiny_method("full")
    tiling = TilingConfig(overlap=(4, 4), window="cosine", grid="fixed", wrap=True, batch=8)
    stride = method.native_tile[1] - 4
    x = torch.randn(1, 3, 2 * stride, 3 * stride, generator=torch.Generator().manual_seed(0)) * 5
    sigma = torch.tensor([5.0])
    for wrap in (True, False):
        denoiser = method.tiled_denoiser(net, tiling=dataclasses.replace(tiling, wrap=wrap))
        rolled_then_denoised = denoiser(torch.roll(x, stride, dims=3), sigma)
        denoised_then_rolled = torch.roll(denoiser(x, sigma), stride, dims=3)
        error = float((rolled_then_denoised - denoised_then_rolled).abs().max())
        if wrap:
            assert error < 1e-5, error
        else:
            assert error > 1e-2, error
    out = method.sample(net, SampleRNG([5]), 32, 48, steps=3, tiling=dataclasses.replace(tiling, grid="random"))
    assert out.shape == (1, 3, 32, 48) and torch.isfinite(out).all()


def test_passes_from_the_command_line_in_memory_and_on_disk_alike(tmp_path, capsys):
    """`--passes 3 --passes-last 1`: the last step averages three grids; the RAM and disk canvases agree
    bit for bit, and a job folder left by a run with other passes is not resumed as if it were the same."""
    from patchdiffusion.cli import main
    from patchdiffusion.train import train

    run = tmp_path / "run"
    config = tiny_config("full", 16, "data.source=builtin:textures?count=4", "train.steps=1", "train.batch_size=2",
                         "train.sample_images=0", "train.device=cpu", "sample.num_steps=3")
    train(config, run, progress=False, log=lambda *a: None)
    common = ["sample", "--run", str(run), "--size", "48x32", "--num", "1", "--no-progress", "--grid", "random"]
    assert main([*common, "--passes", "3", "--passes-last", "1", "--canvas", "memory", "--out", str(tmp_path / "m")]) == 0
    assert "x3 passes in the last 1 steps" in capsys.readouterr().out
    assert main([*common, "--passes", "3", "--passes-last", "1", "--canvas", "disk", "--out", str(tmp_path / "d")]) == 0
    images = [torch.from_numpy(__import__("numpy").array(Image.open(tmp_path / f / "000000.png"))) for f in "md"]
    assert torch.equal(images[0], images[1])
    # The passes change the result (an untrained network's PNG saturates: compared before 8 bits).
    method, net = tiny_method("full")
    one, three = (method.sample(net, SampleRNG([2]), 32, 48, steps=3, tiling=TilingConfig(grid="random", passes=k,
                                                                                          passes_last=1))
                  for k in (1, 3))
    assert not torch.equal(one, three)
    assert main([*common, "--passes", "0"]) == 2
    assert "--passes" in capsys.readouterr().err


def test_a_canvas_depends_only_on_its_own_seed_grid_included(tmp_path):
    """Canvas i of `--seed s --num n` is the canvas of `--seed s+i --num 1`: its noise and its moving grid's
    offsets are keyed by its own seed (two canvases of one call do not share grid lines)."""
    from patchdiffusion.sample import generate_canvases
    from patchdiffusion.train import train

    run = tmp_path / "run"
    config = tiny_config("full", 16, "data.source=builtin:textures?count=4", "train.steps=1", "train.batch_size=2",
                         "train.sample_images=0", "train.device=cpu", "sample.num_steps=2")
    train(config, run, progress=False, log=lambda *a: None)
    tiling = TilingConfig(grid="random", overlap=(4, 4))
    common = dict(height=32, width=48, tiling=tiling, storage="memory", image_format="tiff", progress=False,
                  log=lambda *a: None)
    pair = generate_canvases(run, tmp_path / "pair", num=2, seed=7, **common)
    alone = generate_canvases(run, tmp_path / "alone", num=1, seed=8, **common)
    import tifffile

    assert (tifffile.imread(pair[1]) == tifffile.imread(alone[0])).all()


def test_a_rerun_keeps_the_canvases_it_already_finished(tmp_path, monkeypatch):
    """`--num 2` killed after the first canvas and run again: the finished canvas is kept (its record holds
    the digest of every parameter), the other is made; with other parameters both are made again."""
    import patchdiffusion.canvas as canvas
    from patchdiffusion.sample import generate_canvases
    from patchdiffusion.train import train

    run = tmp_path / "run"
    config = tiny_config("full", 16, "data.source=builtin:textures?count=4", "train.steps=1", "train.batch_size=2",
                         "train.sample_images=0", "train.device=cpu")
    train(config, run, progress=False, log=lambda *a: None)
    out, logs, made = tmp_path / "out", [], []
    real_sample_canvas = canvas.sample_canvas
    monkeypatch.setattr(canvas, "sample_canvas", lambda *a, **k: made.append(k["job"].name) or real_sample_canvas(*a, **k))

    def make(steps):
        return generate_canvases(run, out, num=2, height=24, width=40, steps=steps, progress=False, log=logs.append)

    first = [p.read_bytes() for p in make(2)]
    assert made == [".job-000000", ".job-000001"]
    (out / ".done-000001").unlink()  # killed after writing canvas 1's image, before its record
    made.clear()
    again = [p.read_bytes() for p in make(2)]
    assert made == [".job-000001"] and again == first
    assert "000000.png: already made by this command, kept (remove it to make it again)" in logs
    made.clear()
    make(3)  # other parameters: nothing is taken for done
    assert made == [".job-000000", ".job-000001"]


def test_ctrl_c_while_sampling_canvases_is_one_line_that_says_how_to_go_on(tmp_path, monkeypatch, capsys):
    import patchdiffusion.sample as sample
    from patchdiffusion.cli import main
    from patchdiffusion.train import train

    run = tmp_path / "run"
    config = tiny_config("full", 16, "data.source=builtin:textures?count=4", "train.steps=1", "train.batch_size=2",
                         "train.sample_images=0", "train.device=cpu")
    train(config, run, progress=False, log=lambda *a: None)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sample, "generate_canvases", interrupted)
    assert main(["sample", "--run", str(run), "--size", "48x32", "--out", str(tmp_path / "o"), "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "stopped; the same command continues" in err and len(err.strip().splitlines()) == 1
    monkeypatch.setattr(sample, "generate_images", interrupted)
    assert main(["sample", "--run", str(run), "--out", str(tmp_path / "p"), "--no-progress"]) == 130
    assert capsys.readouterr().err.strip() == "patchdiff sample: stopped"

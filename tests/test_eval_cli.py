"""`patchdiff eval` end to end: built-in images, reference files, run directories, one-line errors."""

import json
import time

import numpy as np
import pytest
import torch

from patchdiffusion.cli import main
from patchdiffusion.eval import ENV_VAR, build_inception, load_reference
from patchdiffusion.eval.detectors import PIPELINE_PYTORCH_FID


@pytest.fixture(autouse=True)
def no_weights_anywhere(tmp_path, monkeypatch):
    """No Inception file unless a test passes one: empty cache folder, no environment variable."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    """A random Inception saved as pytorch-fid's state dict: the pipeline runs, the numbers mean nothing."""
    path = tmp_path_factory.mktemp("weights") / "pt_inception-random.pth"
    torch.save(build_inception(seed=0).state_dict(), path)
    return path


def error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("\r")]
    assert len(err) == 1, err
    return err[0]


def test_1000_builtin_images_against_their_own_reference(tmp_path, capsys):
    """The issue's CPU check: 1,000 built-in images vs themselves report SWD (0), and FID is explained away."""
    out = tmp_path / "eval.json"
    start = time.perf_counter()
    code = main(["eval", "--images", "builtin:photos?count=1000", "--ref", "builtin:photos?count=1000",
                 "--resolution", "32", "--metrics", "fid,swd", "--json", str(out), "--no-progress"])
    elapsed = time.perf_counter() - start
    assert code == 0
    printed = capsys.readouterr().out
    assert "SWD@1k avg x10^3" in printed and "SWD@1k 32px" in printed and "SWD@1k 16px" in printed
    assert "no Inception weights file" in printed and "--inception PATH" in printed
    assert "fid: skipped" in printed and "SWD pipeline: ProGAN" in printed
    report = json.loads(out.read_text())
    assert report["num_images"] == report["num_reference"] == 1000
    assert report["metrics"]["swd"]["value"] == pytest.approx(0.0, abs=1e-9)
    assert report["metrics"]["swd"]["label"] == "SWD@1k avg x10^3"
    assert "fid" in report["skipped"] and report["inception"] is None
    print(f"1000 vs 1000 built-in images at 32x32, SWD: {elapsed:.1f} s")


def test_reference_file_then_fid_kid_is_pr_with_a_random_inception(tmp_path, capsys, random_inception):
    ref = tmp_path / "refs" / "photos-32.npz"
    images = "builtin:photos?count=10"
    assert main(["eval", "ref", "--data", images, "--dest", str(ref), "--inception", str(random_inception),
                 "--resolution", "32", "--batch", "10", "--no-progress"]) == 0
    assert "Inception pipeline: pytorch-fid" in capsys.readouterr().out
    stored = load_reference(ref)
    assert stored.statistics.mu.shape == (2048,) and stored.statistics.sigma.shape == (2048, 2048)
    assert stored.features.shape == (10, 2048) and stored.pipeline == PIPELINE_PYTORCH_FID
    assert stored.image_size == (32, 32) and stored.statistics.count == 10
    with np.load(ref) as raw:  # EDM's fid.py reads exactly these two keys
        assert raw["mu"].dtype == np.float64 and raw["sigma"].dtype == np.float64

    out = tmp_path / "same.json"
    assert main(["eval", "--images", images, "--ref", str(ref), "--resolution", "32", "--metrics", "fid,kid,is,pr",
                 "--inception", str(random_inception), "--batch", "10", "--json", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "Inception pipeline: pytorch-fid (uint8 RGB -> /255 -> bilinear resize to 299x299" in printed
    for label in ("FID@10", "KID@10 x10^3", "IS@10", "precision@10 (k=3)", "recall@10 (k=3)"):
        assert label in printed
    metrics = json.loads(out.read_text())["metrics"]
    assert metrics["fid"]["value"] == pytest.approx(0.0, abs=1e-6)  # the same images as the reference
    assert metrics["precision"]["value"] == 1.0 and metrics["recall"]["value"] == 1.0
    assert metrics["is"]["value"] >= 1.0 and metrics["is"]["details"]["splits"] == 10


def test_edm_reference_holds_mu_sigma_only(tmp_path):
    """EDM's fid-refs hold only mu and sigma: they load, and the report says the pipeline is unrecorded."""
    from patchdiffusion.eval.evaluate import _pipeline_notes
    from patchdiffusion.eval.detectors import random_inception_detector

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "edm.npz", mu=rng.normal(size=8), sigma=np.eye(8))
    stored = load_reference(tmp_path / "edm.npz")
    assert stored.features is None and stored.pipeline is None and stored.statistics.count == 0
    notes = _pipeline_notes(stored, random_inception_detector())
    assert len(notes) == 1 and "does not record its Inception pipeline" in notes[0]


def test_run_directory_generates_then_evaluates(tmp_path, capsys):
    run = tmp_path / "run"
    tiny = ["--data", "builtin:textures?count=16", "--resolution", "16", "--batch", "4", "--device", "cpu",
            "--no-progress", "model.net.model_channels=16", "model.net.channel_mult=[1,2]",
            "model.net.num_res_blocks=1", "model.net.head_channels=16", "train.sample_images=4"]
    assert main(["train", "--run", str(run), "--steps", "1", *tiny]) == 0
    capsys.readouterr()
    samples = tmp_path / "samples"
    assert main(["eval", "--images", str(run), "--num", "4", "--steps", "3", "--samples", str(samples),
                 "--ref", "builtin:textures?count=8", "--metrics", "swd,seam", "--tile", "8", "--device", "cpu",
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "generated 4 images from run" in printed and "SWD@4 avg x10^3" in printed and "seam@4 (8x8 tiles)" in printed
    report = json.loads((run / "eval.json").read_text())  # beside the run by default
    assert report["num_images"] == 4 and report["size"] == [16, 16]
    assert sorted(p.name for p in samples.glob("*.png")) == [f"{i:06d}.png" for i in range(4)] + ["grid.png"]


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--images", "builtin:photos?count=4", "--ref", "builtin:photos?count=4", "--metrics", "fid,bogus"],
         "unknown metric 'bogus'"),
        (["--images", "builtin:photos?count=4", "--metrics", "seam"], "--tile"),
        (["--images", "builtin:photos?count=4", "--metrics", "swd"], "--ref is needed"),
        (["--ref", "builtin:photos?count=4"], "--images is required"),
        (["--images", "builtin:photos?count=4", "--ref", "missing.npz"], "missing.npz"),
        (["--images", "builtin:photos?count=4", "--ref", "builtin:photos", "--inception", "absent.pth"], "absent.pth"),
        (["--images", "builtin:photos?count=4", "--ref", "builtin:photos", "--num", "9"], "9 were asked for"),
        (["--images", "builtin:photos?count=4", "--metrics", "seam", "--tile", "x"], "--tile 'x'"),
        (["--images", "builtin:photos?count=4", "--metrics", "wrap", "--resolution", "32"], "leave out --resolution"),
    ],
)
def test_user_errors_are_one_line(capsys, args, needle):
    assert main(["eval", *args, "--no-progress"]) == 2
    line = error_line(capsys)
    assert line.startswith("patchdiff eval: error:") and needle in line


def test_eval_ref_without_weights_says_where_to_put_them(capsys):
    assert main(["eval", "ref", "--data", "builtin:photos?count=4", "--dest", "r.npz", "--no-progress"]) == 2
    line = error_line(capsys)
    assert "PATCHDIFF_INCEPTION" in line and "pt_inception-2015-12-05-6726825d.pth" in line


def test_run_directory_needs_num(tmp_path, capsys):
    run = tmp_path / "fake-run"
    run.mkdir()
    (run / "config.yaml").write_text("method: full\n")
    assert main(["eval", "--images", str(run), "--ref", "builtin:photos", "--metrics", "swd"]) == 2
    assert "--num" in error_line(capsys)


def test_sample_folder_is_evaluated_without_its_grid(tmp_path, capsys):
    """`patchdiff sample` writes grid.png beside the images; eval reads the images only and says so."""
    from PIL import Image

    folder = tmp_path / "samples"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i:06d}.png")
    Image.fromarray(rng.integers(0, 256, (18, 52, 3), dtype=np.uint8)).save(folder / "grid.png")
    out = tmp_path / "eval.json"
    assert main(["eval", "--images", str(folder), "--metrics", "seam", "--tile", "8", "--json", str(out),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "(3 images read, 16x16; skipped 1 grid file)" in printed
    assert "read 3 images, skipped 1 grid file written by patchdiff sample (grid.png)" in printed
    assert "seam@3" in printed
    report = json.loads(out.read_text())
    assert report["num_images"] == 3 and report["skipped_grid_files"] == 1


def test_unpublished_inception_weights_are_a_warning_in_the_report(tmp_path, capsys, random_inception):
    out = tmp_path / "eval.json"
    assert main(["eval", "--images", "builtin:photos?count=4", "--ref", "builtin:photos?count=4", "--metrics", "fid",
                 "--resolution", "16", "--inception", str(random_inception), "--json", str(out),
                 "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "WARNING: Inception weights" in captured.out and "NOT comparable with published figures" in captured.out
    assert "patchdiff eval: WARNING: Inception weights" in captured.err
    report = json.loads(out.read_text())
    assert report["inception"]["published_as"] is None and len(report["inception"]["sha256"]) == 64


def test_wrap_seam_of_textures_that_tile_and_of_ones_that_do_not(tmp_path, capsys):
    """`--metrics wrap`: textures that tile score inside the spread of lines elsewhere; with a brightness
    ramp (which jumps back at the wrap edge) far above it. No reference and no weights needed."""
    from PIL import Image

    rng = np.random.default_rng(0)
    fy, fx = np.fft.fftfreq(48)[:, None, None], np.fft.fftfreq(80)[None, :, None]
    reports = {}
    for kind, ramp in (("tiles", 0.0), ("ramp", 50.0)):
        folder = tmp_path / kind
        folder.mkdir()
        for i in range(6):  # smooth noise made periodic by a circular (FFT) blur
            noise = rng.standard_normal((48, 80, 3))
            smooth = np.fft.ifft2(np.fft.fft2(noise, axes=(0, 1)) * np.exp(-(fy ** 2 + fx ** 2) * 150), axes=(0, 1)).real
            image = 128 + 40 * smooth / smooth.std() + np.linspace(0, ramp, 80)[None, :, None]
            Image.fromarray(image.clip(0, 255).round().astype(np.uint8)).save(folder / f"{i:06d}.png")
        out = tmp_path / f"{kind}.json"
        assert main(["eval", "--images", str(folder), "--metrics", "wrap", "--json", str(out), "--no-progress"]) == 0
        assert "wrap seam@6 (lines elsewhere" in capsys.readouterr().out
        reports[kind] = json.loads(out.read_text())["metrics"]["wrap"]
    low, high = reports["tiles"]["details"]["elsewhere_5_95"]
    assert low < reports["tiles"]["value"] < high and abs(reports["tiles"]["value"] - 1) < 0.1
    assert reports["ramp"]["value"] > 1.5 > reports["ramp"]["details"]["elsewhere_5_95"][1]

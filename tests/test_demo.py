"""`patchdiff demo` writes its whole report: a seconds-long version of the default demo, every file and figure checked."""

import base64
import json
import math
import re
import subprocess
import sys

import pytest
from PIL import Image

from patchdiffusion.demo import DEFAULT_METHOD, RECIPES, demo_config, held_out_spec, run_demo

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The default method for a few steps, 16 measured samples and a 96x96 canvas (9x the 32x32 tiles)."""
    out = tmp_path_factory.mktemp("demo")
    report = run_demo(
        out, minutes=5, device="cpu", progress=False, canvas_size=96, num_samples=16, log=lambda m: None,
        overrides=["train.steps=6", "train.log_every=1", "sample.num_steps=3", "data.source=builtin:textures?count=40"],
    )
    return out, report, json.loads((out / "summary.json").read_text())


def test_demo_writes_every_file(demo):
    out, report, _ = demo
    assert report == out / "report.md"
    for name in ("report.md", "report.html", "summary.json", "canvas.png", "samples_vs_real.png", "samples.png",
                 "real.png", "loss.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "run" / "config.yaml").is_file()  # a run directory `patchdiff sample --run` can use
    assert not (out / "canvas_job").exists()  # the canvas job's scratch is cleaned up
    with Image.open(out / "canvas.png") as canvas:
        assert canvas.size == (96, 96) and canvas.mode == "RGB"
    with Image.open(out / "samples_vs_real.png") as sheet:  # two labelled panels side by side
        assert sheet.width > 2 * sheet.height * 0.9


def test_demo_figures(demo):
    _, _, s = demo
    assert s["method"] == DEFAULT_METHOD and s["steps"] == 6 and s["num_samples"] == 16
    assert s["sampler"] == RECIPES[DEFAULT_METHOD].sampler and s["sampler_steps"] == 3
    swd = s["swd"]
    assert all(math.isfinite(v) and v > 0 for v in swd.values())
    assert swd["real"] < swd["noise"]  # the scale a reader needs: real crops far closer than noise
    assert s["held_out"] == "builtin:textures?count=16&seed=1"
    canvas = s["canvas"]
    assert canvas["size"] == [96, 96] and canvas["area_x"] == 9 and canvas["tile"] == [32, 32]
    assert s["classes"][:2] == ["red-brick", "green-grass"] and canvas["class"] == "green-grass"  # one texture
    assert canvas["peak_rss_mib"] > 10 and canvas["seconds"] > 0
    seam = s["seam"]
    assert seam["period"] == [32 - canvas["overlap"][0], 32 - canvas["overlap"][1]]
    assert seam["real_images"] == 3  # the held-out crops of the canvas's family (16 crops, every 5th)
    for which in ("canvas", "real"):
        assert math.isfinite(seam[which]["worst"]) and seam[which]["worst"] >= seam[which]["at_grid"]
    assert s["loss_first"] > 0 and s["loss_last"] > 0


def test_demo_reports_carry_the_figures(demo):
    out, report, s = demo
    text = report.read_text()
    for figure in (f"{s['swd']['samples']:.1f}", f"{s['swd']['real']:.1f}", f"{s['swd']['noise']:.1f}",
                   f"{s['seam']['canvas']['worst']:.3f}", f"{s['seam']['real']['worst']:.3f}",
                   f"{s['canvas']['peak_rss_mib']:.0f} MiB", "96x96", f"{s['steps']} steps"):
        assert figure in text, figure
    for name in ("canvas.png", "samples_vs_real.png", "loss.png"):
        assert f"]({name})" in text
    page = (out / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert len(sources) == 3
    for src in sources:  # self-contained: every picture is an embedded PNG, nothing is fetched
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_MAGIC)
    assert f"{s['seam']['canvas']['worst']:.3f}" in page and f"{s['swd']['samples']:.1f}" in page


def test_demo_defaults_need_no_arguments():
    config = demo_config()
    assert config.method == DEFAULT_METHOD != "full"  # the demo shows a patch method
    assert config.data.source == "builtin:textures" and config.data.resolution == (32, 32)
    assert config.sample.sampler == RECIPES[DEFAULT_METHOD].sampler
    assert config.train.sample_images == 0  # the demo samples and measures itself


def test_every_recipe_builds():
    from patchdiffusion.methods import build_method

    for method in RECIPES:
        config = demo_config(method, device="cpu")
        build_method(config.method, config.model, config.data.resolution).validate()


def test_canvas_class_errors():
    from patchdiffusion.demo import pick_class
    from patchdiffusion.errors import ConfigError

    assert pick_class(["a", "green-grass"], None) == 1 and pick_class(["a", "b"], None) == 0
    assert pick_class(["a", "b"], "b") == 1 and pick_class([], None) is None
    with pytest.raises(ConfigError, match="unknown canvas class 'c'"):
        pick_class(["a", "b"], "c")
    with pytest.raises(ConfigError, match="class-conditional"):
        pick_class([], "b")


def test_held_out_spec():
    assert held_out_spec("builtin:textures", 8) == "builtin:textures?seed=1&count=8"
    assert held_out_spec("builtin:textures?seed=4&count=40", 8) == "builtin:textures?seed=5&count=8"
    assert held_out_spec("my_photos/", 8) is None


def test_cli_demo_help_and_errors():
    done = subprocess.run([sys.executable, "-m", "patchdiffusion.cli", "demo", "--help"], capture_output=True,
                          text=True)
    assert done.returncode == 0
    assert "--minutes" in done.stdout and "--method" in done.stdout and "report.html" in done.stdout
    assert "--canvas-size" not in done.stdout  # the test-only options stay out of the help
    done = subprocess.run([sys.executable, "-m", "patchdiffusion.cli", "demo", "--method", "nope"],
                          capture_output=True, text=True)
    assert done.returncode != 0 and "invalid choice: 'nope'" in done.stderr


def test_free_cpu_threads():
    from patchdiffusion.demo import free_cpu_threads

    assert free_cpu_threads(load=0.1, cores=2, current=2) == 2  # an idle machine: torch's own count
    assert free_cpu_threads(load=1.2, cores=2, current=2) == 1  # one core busy elsewhere
    assert free_cpu_threads(load=6.0, cores=2, current=2) == 1  # never fewer than one
    assert free_cpu_threads(load=0.0, cores=16, current=4) == 4  # never more than torch was given

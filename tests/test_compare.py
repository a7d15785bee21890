"""`patchdiff compare`: a two-method comparison end to end (tiny networks, seconds of CPU budget), resume,
the comparison networks' sizes, and the claim verdicts on hand-made records."""

import json
import re

import pytest
import torch

from conftest import TINY_METHODS
from patchdiffusion.compare import (
    CompareSettings,
    held_out_source,
    overrides_for,
    resolve_entries,
    run_comparison,
    size_match,
)
from patchdiffusion.config import RunConfig, apply_overrides
from patchdiffusion.errors import ConfigError
from patchdiffusion.methods import build_method
from patchdiffusion.methods.base import COMPARISON_TOLERANCE, time_to_reach
from patchdiffusion.registry import method_class, method_names
from patchdiffusion.rng import SampleRNG

TWO = ("full", "patch_ddpm")


def tiny_settings(**changes) -> CompareSettings:
    overrides = [f"{m}:{o}" for m in TWO for o in TINY_METHODS[m]] + [f"{m}:sample.num_steps=3" for m in TWO]
    values = dict(methods=list(TWO), resolution=16, cpu_minutes=0.01, large_size=32, images=8, curve_images=4,
                  curve_points=2, memory_batch=2, overrides=overrides)
    return CompareSettings(**{**values, **changes})


def train_own_run(run_dir):
    """A user's own run (3 steps of a tiny full-image model) to join a comparison."""
    from patchdiffusion.train import train

    config = apply_overrides(RunConfig(), ["method=full"])
    config = apply_overrides(config, TINY_METHODS["full"] + [
        "data.resolution=16", "train.steps=3", "train.batch_size=2", "train.sample_images=0", "train.device=cpu",
        "sample.num_steps=3"])
    train(config, run_dir, progress=False, log=lambda m: None)


def test_two_method_comparison_writes_results_and_reports(tmp_path):
    """Two methods trained here and a run directory: results.json's fields, both reports, then a resume."""
    train_own_run(tmp_path / "mine")
    out = tmp_path / "cmp"
    settings = tiny_settings(methods=[*TWO, str(tmp_path / "mine")])
    results = run_comparison(settings, out, jobs=2, progress=False, log=lambda m: None, command="test")
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["entries"].keys() == {*TWO, "mine"} == results["entries"].keys()
    assert on_disk["command"] == "test" and on_disk["machine"]["cpu_count"] >= 1
    floor = on_disk["reference"]["swd_train_vs_held_out"]
    assert floor["value"] > 0 and "SWD" in floor["unit"]
    mine = on_disk["entries"].pop("mine")  # the user's run: evaluated as it is, not trained again
    assert mine["method"] == "full" and not mine["trained_here"] and mine["training"]["steps"]["value"] == 3
    assert mine["quality"]["swd"]["value"] > 0 and mine["seams"]["worst"]["value"] > 0
    for label, record in on_disk["entries"].items():
        assert record["method"] == label and record["trained_here"]
        for group, names in {"network": ("parameters", "forward_flops", "train_flops", "sampling_flops"),
                             "training": ("steps", "images_seen", "cpu_seconds", "wall_seconds", "cpu_seconds_per_image"),
                             "quality": ("swd",)}.items():
            for name in names:
                fig = record[group][name]
                assert fig["unit"] and fig["value"] is not None and fig["value"] > 0, (label, group, name, fig)
        # the budget was spent (the run stops after the step that crosses it) and the curve has both points
        assert record["training"]["cpu_seconds"]["value"] >= 0.6
        assert [p["point"] for p in record["curve"]] == [1, 2]
        assert record["curve"][0]["cpu_seconds"] < record["curve"][1]["cpu_seconds"]
        assert all(p["swd"] > 0 for p in record["curve"])
        sampling = record["sampling"]
        assert sampling["train_size"]["size"] == [16, 16] and sampling["large_size"]["size"] == [32, 32]
        for part in ("train_size", "large_size"):
            assert sampling[part]["peak_memory"]["unit"].startswith("bytes")
            assert sampling[part]["peak_memory"]["value"] > 0
        assert sampling["train_size"]["memory_per_image"]["unit"].startswith("bytes per extra image")
        assert sampling["train_size"]["cpu_seconds_per_image"]["value"] > 0
        seams = record["seams"]
        for name in ("at_grid", "worst", "real_at_grid", "real_worst"):
            assert 0 < seams[name]["value"] < 10
        assert seams["worst"]["value"] >= seams["at_grid"]["value"]
        assert (out / record["images"]["samples"]).is_file() and (out / record["images"]["large"]).is_file()
        assert len(list((out / label / "samples").glob("*.png"))) == 8
    assert on_disk["size_match"]["parameters"]["max_over_min"] >= 1
    assert any(c["method"] == "patch_ddpm" for c in on_disk["claims"])
    md, html = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "data:image" not in md  # html self-contained, md links files
    for link in re.findall(r"!\[[^]]*\]\(([^)]+)\)", md):
        assert (out / link).is_file(), link  # every image the markdown shows lies beside it
    for report in (md, html):
        assert "patch_ddpm" in report and "full" in report and "SWD" in report
        assert "halve the peak sampling memory" in report  # the claims section
    assert "<table>" in html and "| entry |" in md

    # The same call again: nothing is trained or evaluated again, the reports are rewritten.
    before = {label: (out / label / "record.json").stat().st_mtime_ns for label in TWO}
    again = run_comparison(settings, out, jobs=2, progress=False, log=lambda m: None, command="test")
    assert {label: (out / label / "record.json").stat().st_mtime_ns for label in TWO} == before
    assert again["entries"]["full"]["quality"]["swd"] == results["entries"]["full"]["quality"]["swd"]

    # Other settings in the same folder are refused in one line naming what changed.
    with pytest.raises(ConfigError, match="cpu_minutes"):
        run_comparison(tiny_settings(methods=settings.methods, cpu_minutes=0.02), out, progress=False,
                       log=lambda m: None)


def test_a_half_trained_entry_resumes_from_its_checkpoint(tmp_path):
    """A worker that stopped after its first segment leaves a checkpoint; the next call continues from it."""
    from patchdiffusion import run as runs
    from patchdiffusion.compare import EntryWorker, prepare_study

    out = tmp_path / "cmp"
    settings = tiny_settings(methods=["full"], cpu_minutes=0.06)  # the first step alone costs a few CPU seconds
    prepare_study(settings, out, "test")
    worker = EntryWorker(out, "full")
    worker.settings.curve_points = 1  # train a single step, as if interrupted there
    worker.settings.cpu_minutes = 1e-4
    worker.train()
    first = runs.latest_checkpoint(out / "full" / "run")
    assert first is not None
    run_comparison(settings, out, progress=False, log=lambda m: None, command="test")
    log = (out / "full" / "log.txt").read_text()
    assert f"resumed from {first.path} at step {first.step}" in log
    record = json.loads((out / "full" / "record.json").read_text())
    assert record["training"]["steps"]["value"] > first.step


def test_entries_and_overrides_are_checked_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match="neither a method"):
        resolve_entries(["no_such_method"])
    assert [e.label for e in resolve_entries(["full", "full"])] == ["full", "full-2"]
    with pytest.raises(ConfigError, match="'nope' is not a method"):
        CompareSettings(methods=["full"], overrides=["nope:train.lr=1"])
    with pytest.raises(ConfigError, match="smaller than the training size"):
        CompareSettings(methods=["full"], resolution=32, large_size=16)
    assert overrides_for("full", ["full:a.b=1", "dimr:c=2", "d=builtin:x"]) == ["a.b=1", "d=builtin:x"]
    spec, note = held_out_source("builtin:textures?count=50&seed=3")
    assert spec == "builtin:textures?seed=4" and "held out" in note
    assert "NOT held out" in held_out_source("some/folder")[1]


def test_time_to_reach_interpolates_between_curve_points():
    curve = [{"cpu_seconds": 10, "swd": 100}, {"cpu_seconds": 20, "swd": 50}, {"cpu_seconds": 30, "swd": 40}]
    assert time_to_reach(curve, 75) == pytest.approx(15)
    assert time_to_reach(curve, 200) == 10
    assert time_to_reach(curve, 10) is None


def forward_macs(method, net) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    h, w = method.resolution
    cond = method.sampling_condition(net, SampleRNG([1]), None, None)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        method.denoiser(net, None)(torch.randn(1, 3, h, w), torch.ones(1), **cond)
    return counter.get_total_flops() / 2


def test_default_comparison_networks_are_matched_within_the_tolerance():
    """Every method's comparison network at 32² builds; parameters and FLOPs per evaluation agree within
    COMPARISON_TOLERANCE, except what a method declares unmatched (and says why)."""
    for side in (32,):
        params, flops = {}, {}
        for name in method_names():
            cls = method_class(name)
            config = apply_overrides(RunConfig(), [f"method={name}"])
            config = apply_overrides(config, cls.comparison_overrides((side, side)) + [f"data.resolution={side}"])
            method = build_method(name, config.model, config.data.resolution)
            method.bind_data(1000)
            net = method.build_network().eval()
            params[name] = sum(p.numel() for p in net.parameters())
            if "flops" not in cls.comparison_unmatched:
                flops[name] = forward_macs(method, net)
            for figure, why in cls.comparison_unmatched.items():
                assert figure in ("params", "flops") and len(why) > 20
        assert max(params.values()) / min(params.values()) <= COMPARISON_TOLERANCE, (side, params)
        assert max(flops.values()) / min(flops.values()) <= COMPARISON_TOLERANCE, (side, flops)


def fake_record(method, swd=50.0, flops=250e6, train_flops=750e6, cpu_per_image=0.03, memory=100e6,
                large_memory=200e6, at_grid=1.0, worst=1.05, curve=((60, 80), (120, 50))):
    def fig(value):
        return {"value": value, "unit": "u"}

    return {"method": method, "label": method, "trained_here": True,
            "network": {"parameters": fig(1.2e6), "forward_flops": fig(flops), "train_flops": fig(train_flops)},
            "training": {"steps": fig(1000), "cpu_seconds_per_image": fig(cpu_per_image)},
            "curve": [{"point": i + 1, "cpu_seconds": c, "swd": s} for i, (c, s) in enumerate(curve)],
            "quality": {"swd": fig(swd), "swd_curve_last_change": fig(2.0)},
            "sampling": {"train_size": {"batch": 16, "peak_memory": fig(memory + 20e6), "memory_per_image": fig(memory / 16),
                                        "cpu_seconds_per_image": fig(0.3)},
                         "large_size": {"peak_memory": fig(large_memory)}},
            "seams": {"period": [24, 24], "tiling": {"grid": "fixed"}, "at_grid": fig(at_grid), "worst": fig(worst),
                      "real_at_grid": fig(1.0), "real_worst": fig(1.1)}}


def verdict(method, records):
    claims = method_class(method).comparison_claims(records)
    assert len(claims) == 1 and claims[0].evidence
    return claims[0].verdict


def test_claim_verdicts_follow_the_figures():
    full = fake_record("full")
    assert verdict("patch_diffusion", {"full": full, "pd": fake_record("patch_diffusion", curve=((30, 50), (120, 30)))}) == "holds"
    assert verdict("patch_diffusion", {"full": full, "pd": fake_record("patch_diffusion", curve=((60, 90), (120, 70)))}) \
        == "does not hold"
    assert verdict("patch_diffusion", {"pd": fake_record("patch_diffusion")}) == "not testable"
    assert verdict("patch_ddpm", {"full": full, "p": fake_record("patch_ddpm", memory=45e6, swd=55)}) == "holds"
    assert verdict("patch_ddpm", {"full": full, "p": fake_record("patch_ddpm", memory=95e6)}) == "does not hold"
    assert verdict("patching", {"full": full, "p": fake_record("patching", train_flops=50e6, cpu_per_image=0.003)}) \
        == "holds"
    assert verdict("patching", {"full": full, "p": fake_record("patching", train_flops=50e6, cpu_per_image=0.01)}) \
        .startswith("partly")
    assert verdict("patch_dm", {"p": fake_record("patch_dm", at_grid=1.02, worst=1.1)}) == "holds"
    assert verdict("patch_dm", {"p": fake_record("patch_dm", at_grid=1.9, worst=1.9)}) == "does not hold"
    assert verdict("dimr", {"full": full, "d": fake_record("dimr", swd=40, flops=280e6)}) == "holds"
    assert verdict("dimr", {"full": full, "d": fake_record("dimr", swd=60, flops=280e6)}) == "does not hold"
    assert verdict("dimr", {"full": full, "d": fake_record("dimr", swd=51, flops=280e6)}).startswith("not shown")
    assert verdict("dimr", {"full": full, "d": fake_record("dimr", flops=1e9)}).startswith("not testable")
    assert size_match({"full": full, "d": fake_record("dimr", flops=280e6)})["forward_flops"]["within_tolerance"]


def test_an_inception_file_adds_fid_kid_and_precision_recall_without_retraining(tmp_path):
    """Given later, an Inception file (random weights here: the pipeline runs, the numbers mean nothing)
    only adds the Inception metrics to finished entries."""
    from patchdiffusion.eval.inception import build_inception

    out = tmp_path / "cmp"
    settings = tiny_settings(methods=["full"], images=4, curve_images=2, curve_points=1)
    run_comparison(settings, out, progress=False, log=lambda m: None, command="test")
    steps = json.loads((out / "full" / "record.json").read_text())["training"]["steps"]["value"]
    weights = tmp_path / "pt_inception-random.pth"
    torch.save(build_inception(seed=0).state_dict(), weights)
    settings.inception = str(weights)
    results = run_comparison(settings, out, progress=False, log=lambda m: None, command="test")
    quality = results["entries"]["full"]["quality"]
    for key in ("fid", "kid", "precision", "recall"):
        assert quality[key]["value"] is not None and quality[key]["images"] == 4, (key, quality[key])
    assert results["entries"]["full"]["training"]["steps"]["value"] == steps
    assert (out / "full" / "log.txt").read_text().count("training 'full'") == 1
    assert "FID" in (out / "report.md").read_text()

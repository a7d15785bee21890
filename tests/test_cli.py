"""The `patchdiff` command line: train -> sample round trip, and one-line errors on bad input."""

import pytest
import yaml
from PIL import Image

from patchdiffusion.cli import main

TINY = [
    "--data", "builtin:textures?count=32", "--resolution", "16", "--batch", "4", "--device", "cpu", "--no-progress",
    "model.net.model_channels=16", "model.net.channel_mult=[1,2]", "model.net.num_res_blocks=1",
    "model.net.head_channels=16", "train.sample_images=4",
]


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_help(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "key=value" in out and "--resume" in out


def test_bench_help_is_the_benchmarks_own(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "patch-dm-memory", "--help"])
    assert e.value.code == 0
    assert "--patch-batch" in capsys.readouterr().out
    assert main(["bench", "--help"]) == 0
    assert "NAME --help" in capsys.readouterr().out


def test_full_train_then_sample(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--run", str(run), "--steps", "2", *TINY]) == 0
    out = tmp_path / "samples"
    code = main(["sample", "--run", str(run), "--num", "3", "--seed", "5", "--sampler", "heun", "--steps", "4",
                 "--out", str(out), "--device", "cpu", "--no-progress"])
    assert code == 0
    files = sorted(p.name for p in out.glob("*.png"))
    assert files == ["000005.png", "000006.png", "000007.png", "grid.png"]
    assert Image.open(out / "000005.png").size == (16, 16)


def test_patching_method_trains_and_samples(tmp_path):
    run = tmp_path / "luhman"
    assert main(["train", "--method", "patching", "--patch_size", "4", "--run", str(run), "--steps", "2", *TINY,
                 "model.net.attention_resolutions=[2]"]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["method"] == "patching" and saved["model"]["net"]["patch_size"] == 4
    out = tmp_path / "out"
    assert main(["sample", "--run", str(run), "--num", "2", "--steps", "5", "--out", str(out), "--device", "cpu",
                 "--no-progress"]) == 0
    assert (out / "grid.png").is_file()


def test_resume_continues(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--run", str(run), "--steps", "2", *TINY]) == 0
    assert main(["train", "--run", str(run), "--resume", "--steps", "3", "--no-progress"]) == 0
    assert "resumed from" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "learning_rat=1"], "unknown config key 'learning_rat'"),
        (["train", "--resolution", "20", "--patch_size", "4"], "not divisible"),
        (["train", "--data", "/no/such/folder"], "does not exist"),
        (["sample", "--run", "/no/such/run"], "does not exist"),
        (["train", "--resume"], "--resume needs --run"),
        (["data", "convert", "--source", "builtin:nope", "--dest", "x.zip"], "unknown"),
    ],
)
def test_bad_input_is_one_clear_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    line = error_line(capsys)
    assert line.startswith("patchdiff ") and message in line


def test_wrong_checkpoint_for_config(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--run", str(run), "--steps", "1", *TINY]) == 0
    capsys.readouterr()
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["model"]["net"]["model_channels"] = 8
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["sample", "--run", str(run), "--num", "1", "--device", "cpu", "--no-progress"]) == 2
    assert "does not fit this config" in error_line(capsys)


def test_existing_run_is_not_overwritten(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--run", str(run), "--steps", "1", *TINY]) == 0
    capsys.readouterr()
    assert main(["train", "--run", str(run), "--steps", "1", *TINY]) == 2
    assert "already holds a run" in error_line(capsys)


def test_config_command_prints_every_key(capsys):
    assert main(["config", "--method", "patching"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["method"] == "patching" and printed["model"]["weighting"] == "sqrt_snr"
    assert "batch_size" in printed["train"]


def test_data_convert(tmp_path, capsys):
    dest = tmp_path / "tex.zip"
    assert main(["data", "convert", "--source", "builtin:textures?count=5", "--dest", str(dest),
                 "--resolution", "16", "--no-progress"]) == 0
    assert dest.is_file()


def test_presets_build_and_train(tmp_path, capsys):
    from patchdiffusion.methods import build_method
    from patchdiffusion.presets import PRESETS, preset_config

    for name in PRESETS:
        config = preset_config(name)
        net = build_method(config.method, config.model, config.data.resolution).build_network()
        assert sum(p.numel() for p in net.parameters()) > 1e6, name
    assert main(["config", "--list-presets"]) == 0
    assert "patch-diffusion-cpu" in capsys.readouterr().out
    run = tmp_path / "run"
    assert main(["train", "--preset", "patch-diffusion-cpu", "--run", str(run), "--steps", "1", "--device", "cpu",
                 "--no-progress", "train.sample_images=2", "sample.num_steps=2"]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["method"] == "patch_diffusion"
    assert main(["train", "--preset", "nope"]) == 2
    assert "unknown preset" in capsys.readouterr().err

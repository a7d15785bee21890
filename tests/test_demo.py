"""`patchdiff demo` writes its whole report (a seconds-long version of the 5-minute demo)."""

from patchdiffusion.demo import demo_config, run_demo


def test_demo_writes_report(tmp_path):
    report = run_demo(
        tmp_path, minutes=0, device="cpu", progress=False,
        overrides=["train.steps=3", "train.log_every=1", "train.sample_images=4", "sample.num_steps=2", "data.source=builtin:textures?count=40"],
    )
    for name in ("report.md", "samples.png", "real.png", "loss.png"):
        assert (tmp_path / name).is_file(), name
    text = report.read_text()
    assert "builtin:textures" in text and "steps of batch 16" in text


def test_demo_defaults_need_no_arguments():
    config = demo_config()
    assert config.data.source == "builtin:textures" and config.train.max_minutes == 5.0
    assert config.data.resolution == (32, 32)

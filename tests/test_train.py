"""The training loop: loss goes down, exact resume, safe checkpoints, NaN stop, DDP == 1 process."""

import math
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from patchdiffusion import run as runs
from patchdiffusion.config import RunConfig, apply_overrides
from patchdiffusion.train import TrainingDiverged, train

TINY = [
    "data.source=builtin:textures?count=64",
    "data.resolution=16",
    "model.net.model_channels=16",
    "model.net.channel_mult=[1,2]",
    "model.net.num_res_blocks=1",
    "model.net.attention_resolutions=[8]",
    "model.net.head_channels=16",
    "train.batch_size=4",
    "train.log_every=1",
    "train.warmup_steps=2",
    "train.sample_images=0",
    "train.device=cpu",
]


def tiny_config(*extra):
    return apply_overrides(RunConfig(), TINY + list(extra))


def weights(run_dir, which="net"):
    return runs.load_weights(runs.latest_checkpoint(run_dir), which)


def assert_same(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_resume(tmp_path, workers):
    """N steps + resume + N steps == 2N steps in one go, bitwise (net, EMA and optimizer), also when the
    resumed half loads its data in DataLoader worker processes."""
    one_go = tmp_path / "one"
    train(tiny_config("train.steps=6", "model.net.dropout=0.1"), one_go, progress=False, log=lambda *a: None)
    split = tmp_path / "split"
    train(tiny_config("train.steps=3", "model.net.dropout=0.1"), split, progress=False, log=lambda *a: None)
    messages = []
    config = tiny_config("train.steps=6", "model.net.dropout=0.1", f"data.num_workers={workers}")
    train(config, split, resume=True, progress=False, log=messages.append)
    assert any("resumed from" in m and "at step 3" in m for m in messages)
    assert_same(weights(one_go, "net"), weights(split, "net"))
    assert_same(weights(one_go, "ema"), weights(split, "ema"))
    state_a = runs.load_train_state(runs.latest_checkpoint(one_go))
    state_b = runs.load_train_state(runs.latest_checkpoint(split))
    assert state_a["step"] == state_b["step"] == 6
    for k, v in state_a["optimizer"]["state"].items():
        assert torch.equal(v["exp_avg"], state_b["optimizer"]["state"][k]["exp_avg"])


def test_run_directory_contents(tmp_path):
    train(tiny_config("train.steps=4", "train.sample_images=4"), tmp_path, progress=False, log=lambda *a: None)
    assert (tmp_path / "config.yaml").is_file()
    assert (tmp_path / "loss.png").is_file()
    assert list((tmp_path / "samples").glob("step-*.png"))
    assert len(runs.read_metrics(tmp_path)) == 4
    assert list(tmp_path.glob("events.out.tfevents.*"))
    checkpoint = runs.latest_checkpoint(tmp_path)
    assert checkpoint.step == 4 and (checkpoint.path / "net.safetensors").is_file()


def test_cpu_time_budget_stops_early_and_is_logged(tmp_path):
    """train.max_cpu_minutes ends the run by training CPU time; every metrics row carries cpu_seconds."""
    messages = []
    config = tiny_config("train.steps=10000", "train.max_cpu_minutes=0.002")  # 0.12 s of CPU
    train(config, tmp_path, progress=False, log=messages.append)
    rows = runs.read_metrics(tmp_path)
    assert any("CPU-time budget" in m for m in messages)
    assert 1 <= rows[-1]["step"] < 10000 and runs.latest_checkpoint(tmp_path).step == rows[-1]["step"]
    cpu = [row["cpu_seconds"] for row in rows]
    assert cpu == sorted(cpu) and cpu[-1] >= 0.12


def test_checkpoint_killed_mid_write_keeps_previous(tmp_path):
    """A process killed while writing a checkpoint leaves the previous one complete and loadable."""
    net = {"w": torch.ones(3)}
    runs.save_checkpoint(tmp_path, 1, net, net, {"step": 1})
    script = textwrap.dedent(
        f"""
        import os, torch
        import patchdiffusion.run as runs
        real_save = runs.save_file
        def dying_save(tensors, path):
            real_save(tensors, path)
            os._exit(9)  # killed after the first file of the new checkpoint
        runs.save_file = dying_save
        runs.save_checkpoint({str(tmp_path)!r}, 2, {{"w": torch.zeros(3)}}, {{"w": torch.zeros(3)}}, {{"step": 2}})
        """
    )
    result = subprocess.run([sys.executable, "-c", script])
    assert result.returncode == 9
    latest = runs.latest_checkpoint(tmp_path)
    assert latest.step == 1
    assert torch.equal(runs.load_weights(latest, "net")["w"], torch.ones(3))
    assert runs.load_train_state(latest)["step"] == 1


def test_nan_loss_stops_with_clear_message(tmp_path, monkeypatch):
    from patchdiffusion.methods.full import FullImageMethod

    real_loss = FullImageMethod.loss
    calls = {"n": 0}

    def loss_turning_nan(self, net, batch, rng):
        calls["n"] += 1
        value = real_loss(self, net, batch, rng)
        return value * float("nan") if calls["n"] > 3 else value

    monkeypatch.setattr(FullImageMethod, "loss", loss_turning_nan)
    with pytest.raises(TrainingDiverged, match="loss became nan at step 3"):
        train(tiny_config("train.steps=10", "train.checkpoint_every=2"), tmp_path, progress=False, log=lambda *a: None)
    latest = runs.latest_checkpoint(tmp_path)
    assert latest.step == 2
    assert all(torch.isfinite(v).all() for v in runs.load_weights(latest, "net").values())


def test_loss_goes_down(tmp_path):
    """Last-10% mean loss at least 30% below the first-10% mean on built-in textures."""
    config = tiny_config(
        "train.steps=80", "train.lr=2e-3", "train.batch_size=8", "train.warmup_steps=10",
        "model.net.model_channels=32",
    )
    train(config, tmp_path, progress=False, log=lambda *a: None)
    losses = [r["loss"] for r in runs.read_metrics(tmp_path)]
    tenth = len(losses) // 10
    first, last = sum(losses[:tenth]) / tenth, sum(losses[-tenth:]) / tenth
    print(f"loss first 10% {first:.4f} last 10% {last:.4f} drop {100 * (1 - last / first):.1f}%")
    assert last < 0.7 * first


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")
def test_ddp_two_processes_match_one(tmp_path):
    """2 torchrun processes (gloo, CPU), each loading data with 2 DataLoader workers, give the weights of 1
    process (no workers) at the same global batch."""
    args = [a for a in TINY] + ["train.steps=3", "train.batch_size=4"]
    single = tmp_path / "single"
    double = tmp_path / "double"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "patchdiffusion.cli", "train", "--no-progress"]
    subprocess.run(cli + ["--run", str(single)] + args, check=True, env=env, capture_output=True)
    torchrun = [
        "torchrun", "--standalone", "--nproc_per_node", "2", "-m", "patchdiffusion.cli", "train", "--no-progress",
    ]
    result = subprocess.run(torchrun + ["--run-dir", str(double)] + args + ["data.num_workers=2"], env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same(weights(single, "net"), weights(double, "net"), atol=1e-5)
    assert_same(weights(single, "ema"), weights(double, "ema"), atol=1e-5)


def test_interrupt_writes_a_checkpoint(tmp_path, monkeypatch):
    """Ctrl-C mid-run saves the steps done so far, so --resume loses nothing."""
    from patchdiffusion.methods.full import FullImageMethod

    real_loss = FullImageMethod.loss
    calls = {"n": 0}

    def interrupted_loss(self, *args):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_loss(self, *args)

    monkeypatch.setattr(FullImageMethod, "loss", interrupted_loss)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config("train.steps=10", "train.checkpoint_every=100"), tmp_path, progress=False, log=lambda *a: None)
    assert runs.latest_checkpoint(tmp_path).step == 3


def test_bf16_autocast_on_cpu(tmp_path):
    result = train(tiny_config("train.steps=2", "train.precision=bf16"), tmp_path, progress=False, log=lambda *a: None)
    assert result.step == 2 and math.isfinite(result.last_loss)


def test_fp16_on_cpu_is_refused(tmp_path):
    from patchdiffusion.config import ConfigError

    with pytest.raises(ConfigError, match="fp16 needs CUDA"):
        train(tiny_config("train.steps=1", "train.precision=fp16"), tmp_path, progress=False, log=lambda *a: None)


def test_in_training_swd_is_logged_and_plotted(tmp_path):
    train(tiny_config("train.steps=2", "train.metric_every=1", "train.metric_images=8"), tmp_path,
          progress=False, log=lambda *a: None)
    swd_rows = [r for r in runs.read_metrics(tmp_path) if "swd" in r]
    assert [r["step"] for r in swd_rows] == [1, 2]
    assert all(math.isfinite(r["swd"]) and r["swd"] > 0 for r in swd_rows)
    assert (tmp_path / "loss.png").is_file()

"""Training speed without changing the numbers: compile auto/on/off (decided from the run's budget, failures
fall back to eager), precision auto (probed once, recorded, kept on resume), the lean loop (losses checked at
log steps and before checkpoints, foreach EMA, cached images) and runtime.maybe_compile."""

import json
import re

import pytest
import torch

from patchdiffusion import run as runs
from patchdiffusion import runtime
from patchdiffusion import train as train_module
from patchdiffusion.config import ConfigError, RunConfig, apply_overrides, run_config_from_dict, to_dict
from patchdiffusion.rng import SampleRNG
from patchdiffusion.train import TrainingDiverged, train

from test_train import assert_same, tiny_config, weights


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Measurements (precision probe, compile times) go to a fresh folder, not the user's cache."""
    monkeypatch.setenv("PATCHDIFFUSION_CACHE", str(tmp_path / "cache"))


def quiet(*args, **kwargs):
    pass


# ------------------------------------------------------------------------------------------------
# compile: auto decides from the budget


@pytest.fixture
def stub_compile(monkeypatch):
    """No inductor: 'compiling' returns the function itself, and a compile is said to cost 100 s."""
    compiled = []

    def fake_compile(fn, dynamic=False):
        compiled.append(fn)
        return fn

    monkeypatch.setattr(train_module, "compile_function", fake_compile)
    monkeypatch.setattr(train_module, "estimate_compile_seconds", lambda key, ops: (100.0, "stub"))
    return compiled


def stub_step_seconds(monkeypatch, seconds):
    monkeypatch.setattr(train_module.Trainer, "estimate_step_seconds", lambda self, wall, cpu: (seconds, 2 * seconds))


@pytest.mark.parametrize("minutes, compiles", [(2, False), (60, True)])
def test_auto_compiles_when_the_step_budget_repays_it(tmp_path, monkeypatch, stub_compile, minutes, compiles):
    """40 steps of a (stubbed) eager step time adding up to 2 minutes: no compile; to 60 minutes: compile."""
    stub_step_seconds(monkeypatch, minutes * 60 / 40)
    messages = []
    train(tiny_config("train.steps=40", "train.log_every=10"), tmp_path, progress=False, log=messages.append)
    lines = [m for m in messages if m.startswith("compile")]
    assert len(lines) == 1 and lines[0].startswith(f"compile {'on' if compiles else 'off'} (auto:"), lines
    assert "100 s" in lines[0] or "1.7 min" in lines[0]  # the compile estimate it weighed
    assert bool(stub_compile) == compiles
    choices = [json.loads(line) for line in (tmp_path / "speed_choices.jsonl").read_text().splitlines()]
    assert choices[-1]["compile"] == compiles and choices[-1]["compile_reason"] == lines[0]
    assert runs.load_train_state(runs.latest_checkpoint(tmp_path))["compile"] == compiles


@pytest.mark.parametrize("minutes, compiles", [(2, False), (60, True)])
def test_auto_weighs_the_time_budget(tmp_path, monkeypatch, stub_compile, minutes, compiles):
    """max_minutes caps the budget: 40 steps of 100 s would repay a compile, a 2-minute limit does not."""
    stub_step_seconds(monkeypatch, 100.0)
    messages = []
    train(tiny_config("train.steps=40", f"train.max_minutes={minutes}"), tmp_path, progress=False, log=messages.append)
    line = next(m for m in messages if m.startswith("compile"))
    assert line.startswith(f"compile {'on' if compiles else 'off'} (auto:")
    budget = float(re.search(r"auto: ([\d.]+) min of eager work", line).group(1))
    assert minutes - 1 < budget <= minutes  # the limit less the time already spent (set-up, the probe)


def test_short_runs_do_not_probe(tmp_path, monkeypatch):
    def no_probe(*args):
        raise AssertionError("probed")

    monkeypatch.setattr(train_module.Trainer, "measure_and_decide", no_probe)
    messages = []
    train(tiny_config("train.steps=3"), tmp_path, progress=False, log=messages.append)
    assert any(m.startswith("compile off (auto: 3 steps are too few") for m in messages)


def test_forced_compile_failure_falls_back_to_eager_and_matches_an_eager_run(tmp_path, monkeypatch):
    """A compiler that fails (after drawing random numbers, as a traced loss would) costs one log line: the
    step is redone eagerly from the same random state, so the run equals a run that never compiled."""

    def failing_compile(fn, dynamic=False):
        def compiled(batch, rng):
            rng.randn(3)  # the example streams and the global RNG move before the failure
            torch.rand(5)
            raise RuntimeError("InductorError: no working C++ compiler found\n(a long traceback)")

        return compiled

    monkeypatch.setattr(train_module, "compile_function", failing_compile)
    messages = []
    config = tiny_config("train.steps=4", "train.compile=on", "model.net.dropout=0.1")
    result = train(config, tmp_path / "failed", progress=False, log=messages.append)
    failures = [m for m in messages if "compile failed" in m]
    assert result.step == 4 and len(failures) == 1 and "\n" not in failures[0], messages
    train(tiny_config("train.steps=4", "train.compile=off", "model.net.dropout=0.1"), tmp_path / "eager",
          progress=False, log=quiet)
    assert_same(weights(tmp_path / "failed", "net"), weights(tmp_path / "eager", "net"))
    assert runs.load_train_state(runs.latest_checkpoint(tmp_path / "failed"))["compile"] is False


def test_resume_keeps_the_compile_choice(tmp_path, monkeypatch, stub_compile):
    """auto's choice is made once per run: a resume keeps it (the resumed steps compute what the
    uninterrupted run computed), whatever the budget left."""
    stub_step_seconds(monkeypatch, 90.0)
    train(tiny_config("train.steps=40", "train.checkpoint_every=20"), tmp_path, progress=False, log=quiet)
    assert len(stub_compile) == 1
    stub_step_seconds(monkeypatch, 0.001)  # now the budget would not repay it
    messages = []
    train(tiny_config("train.steps=60"), tmp_path, resume=True, progress=False, log=messages.append)
    assert any(m == "compile on (auto, kept from this run's start)" for m in messages), messages
    assert len(stub_compile) == 2


def test_compile_config_values_and_old_booleans():
    config = RunConfig()
    assert config.train.compile == "auto" and config.train.precision == "auto"
    for value, expected in (("on", "on"), ("off", "off"), ("true", "on"), ("false", "off"), ("auto", "auto")):
        assert apply_overrides(config, [f"train.compile={value}"]).train.compile == expected
    with pytest.raises(ConfigError, match="train.compile must be one of auto, on, off"):
        apply_overrides(config, ["train.compile=sometimes"])
    saved = to_dict(config)  # a config.yaml written before compile had three values
    saved["train"]["compile"] = True
    assert run_config_from_dict(saved).train.compile == "on"
    saved["train"]["compile"] = False
    assert run_config_from_dict(saved).train.compile == "off"


def test_decide_compile_rule():
    assert not runtime.decide_compile("auto", 120, 100, 0.2)  # saves 24 s of 100 s compiling
    assert runtime.decide_compile("auto", 3600, 100, 0.2)  # saves 12 min, 7x the compile
    assert not runtime.decide_compile("auto", 1499, 100, 0.2)  # saves 299.8 s: just short of 3x
    assert runtime.decide_compile("auto", 1500, 100, 0.2)
    assert runtime.decide_compile("on", 0, 1e9, 0) and not runtime.decide_compile("off", 1e9, 0, 1)


def test_compile_measurements_feed_the_next_estimate():
    key = runtime.compile_key("test", torch.device("cpu"))
    seconds, how = runtime.estimate_compile_seconds(key, 1000)
    assert seconds == pytest.approx(1000 * runtime.DEFAULT_SECONDS_PER_OP) and "1000 ops" in how
    runtime.record_compile(key, ops=1000, compile_s=80.0, eager_s=1.0, compiled_s=0.7)
    assert runtime.estimate_compile_seconds(key, 1000)[0] == pytest.approx(80.0 * runtime.WARM_CACHE_SHARE)
    assert runtime.expected_compile_gain(key) == (pytest.approx(0.3), "measured")
    runtime.record_compile(key, compile_s=6.0)
    assert runtime.estimate_compile_seconds(key, 1000) == (6.0, "as last time")
    other = runtime.compile_key("other", torch.device("cpu"))  # a new key: this machine's seconds per op
    assert runtime.estimate_compile_seconds(other, 500)[0] == pytest.approx(40.0)


# ------------------------------------------------------------------------------------------------
# maybe_compile (for sampling)


def test_maybe_compile_auto_counts_times_then_decides(monkeypatch):
    monkeypatch.setattr(runtime, "estimate_compile_seconds", lambda key, ops: (10.0, "stub"))
    calls = []

    def fn(x):
        return x * 2 + 1

    def compiler(f, dynamic=False):
        def compiled(x):
            calls.append("compiled")
            return f(x)
        return compiled

    x = torch.ones(3)
    cheap = runtime.MaybeCompiled(fn, 100, "auto", None, 0.01, None, False, compiler)
    for _ in range(5):
        assert torch.equal(cheap(x), fn(x))
    assert not cheap.choice and calls == []  # 100 calls of 10 ms never repay 10 s
    lines = []
    costly = runtime.MaybeCompiled(fn, 10_000, "auto", None, None, lines.append, False, compiler)
    costly(x)  # counts the operators
    assert costly.choice is None and costly.ops == 2
    monkeypatch.setattr(runtime.time, "perf_counter", iter([0.0, 1.0] + [2.0] * 10).__next__)  # a 1 s call
    costly(x)
    assert costly.choice and "compile on (auto" in lines[-1]
    costly(x)
    assert calls == ["compiled"]


def test_maybe_compile_failure_falls_back_in_one_line():
    def broken(f, dynamic=False):
        def compiled(x):
            raise RuntimeError("CppCompileError: C++ compile error\n...many lines...")
        return compiled

    lines = []
    f = runtime.MaybeCompiled(lambda x: x + 1, 10, "on", None, None, lines.append, False, broken)
    assert torch.equal(f(torch.zeros(2)), torch.ones(2)) and torch.equal(f(torch.ones(2)), 2 * torch.ones(2))
    assert len([line for line in lines if "compile failed, running eagerly: RuntimeError" in line]) == 1
    assert all("\n" not in line for line in lines)


def test_maybe_compile_really_compiles_a_tiny_function(tmp_path, monkeypatch):
    """torch.compile through maybe_compile, with the compiled code cached under the cache folder."""
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    lines = []
    f = runtime.maybe_compile(lambda x: torch.sin(x) * 2 + 1, expected_calls=3, mode="on", log=lines.append)
    x = torch.linspace(0, 1, 64)
    torch.testing.assert_close(f(x), torch.sin(x) * 2 + 1)
    assert f.compiled is not None or any("compile failed" in line for line in lines)  # no compiler: eager
    assert runtime.inductor_cache() == tmp_path / "cache" / "inductor"


# ------------------------------------------------------------------------------------------------
# precision


def test_precision_auto_probes_once_and_explicit_wins(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: True)
    probes = []

    def probe(device):
        probes.append(device)
        return 1.0, 0.6  # bf16 takes 60% of fp32's time

    cpu = torch.device("cpu")
    assert runtime.choose_precision("auto", cpu, probe)[0] == "bf16"
    assert runtime.choose_precision("auto", cpu, probe)[0] == "bf16" and len(probes) == 1  # cached
    assert runtime.choose_precision("fp32", cpu, probe) == ("fp32", "precision fp32 (as configured)")
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: False)
    choice, reason = runtime.choose_precision("auto", cpu, probe)
    assert choice == "fp32" and "no native bf16" in reason and len(probes) == 1
    with pytest.raises(ConfigError, match="fp16 needs CUDA"):
        runtime.choose_precision("fp16", cpu)


def test_precision_slower_bf16_gives_fp32(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: True)
    assert runtime.choose_precision("auto", torch.device("cpu"), lambda d: (1.0, 0.95))[0] == "fp32"


def test_precision_choice_is_recorded_and_kept_on_resume(tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: True)
    monkeypatch.setattr(runtime, "probe_bf16", lambda device, repeats=4: (1.0, 0.5))
    monkeypatch.setattr(train_module, "choose_precision",
                        lambda requested, device: runtime.choose_precision(requested, device, runtime.probe_bf16))
    messages = []
    train(tiny_config("train.steps=2"), tmp_path, progress=False, log=messages.append)
    assert any(m.startswith("precision bf16 (auto: a probe step took 0.50x") for m in messages)
    assert runs.load_train_state(runs.latest_checkpoint(tmp_path))["precision"] == "bf16"
    assert json.loads((tmp_path / "speed_choices.jsonl").read_text().splitlines()[0])["precision"] == "bf16"
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: False)  # another machine would say fp32
    messages = []
    train(tiny_config("train.steps=3"), tmp_path, resume=True, progress=False, log=messages.append)
    assert "precision bf16 (auto, kept from this run's start)" in messages


# ------------------------------------------------------------------------------------------------
# the lean loop


@pytest.mark.parametrize("bad_call, log_every, checkpoint_every, caught_at", [(4, 5, 100, 5), (6, 10, 4, 8)])
def test_nan_found_at_a_later_check_names_its_step_and_is_never_saved(tmp_path, monkeypatch, bad_call, log_every,
                                                                      checkpoint_every, caught_at):
    """Losses are read at log steps and before checkpoints: a NaN at step 3 (call 4) is caught at the step-5 log
    step; one at step 5 before the step-8 checkpoint. Either way the message names the step it appeared at,
    and the checkpoints on disk hold finite weights only."""
    from patchdiffusion.methods.full import FullImageMethod

    real_loss = FullImageMethod.loss
    calls = {"n": 0}

    def loss_turning_nan(self, net, batch, rng):
        calls["n"] += 1
        value = real_loss(self, net, batch, rng)
        return value * float("nan") if calls["n"] >= bad_call else value

    monkeypatch.setattr(FullImageMethod, "loss", loss_turning_nan)
    config = tiny_config("train.steps=20", f"train.log_every={log_every}", f"train.checkpoint_every={checkpoint_every}")
    with pytest.raises(TrainingDiverged, match=f"loss became nan at step {bad_call - 1};"):
        train(config, tmp_path, progress=False, log=quiet)
    assert calls["n"] == caught_at
    saved = runs.list_checkpoints(tmp_path)
    assert [c.step for c in saved] == ([4] if checkpoint_every == 4 else [])
    for checkpoint in saved:
        assert all(torch.isfinite(v).all() for which in ("net", "ema") for v in runs.load_weights(checkpoint, which).values())


def test_foreach_ema_equals_per_tensor_lerp():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.GroupNorm(1, 7), torch.nn.Linear(7, 3))
    ema = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.GroupNorm(1, 7), torch.nn.Linear(7, 3))
    expected = [e.detach().clone().lerp_(p.detach(), 1 - 0.987) for e, p in zip(ema.parameters(), net.parameters())]
    train_module.update_ema(ema, net, 0.987)
    assert all(torch.equal(a, b) for a, b in zip(ema.parameters(), expected))


def test_image_cache_returns_the_same_images_within_its_budget():
    class Counting(torch.utils.data.Dataset):
        reads = 0

        def __len__(self):
            return 4

        def __getitem__(self, i):
            Counting.reads += 1
            return torch.full((3, 2, 2), float(i)), i

    images = train_module.IndexedImages(Counting(), cache_bytes=2 * 3 * 2 * 2 * 4)  # room for two images
    first = [images[i] for i in (0, 1, 2, 0, 1, 2)]
    assert Counting.reads == 4  # 0 and 1 cached, 2 read twice
    assert all(torch.equal(a[0], b[0]) and a[1:] == b[1:] for a, b in zip(first[:3], first[3:]))


def test_sample_rng_clone_continues_identically():
    rng = SampleRNG([1, 2, 3])
    rng.randn(4)
    twin = rng.clone()
    assert torch.equal(rng.randn(2, 2), twin.randn(2, 2)) and torch.equal(rng.rand(), twin.rand())


def test_optimizer_is_fused_or_foreach():
    net = torch.nn.Linear(3, 3)
    optimizer = train_module.build_optimizer(net, RunConfig().train)
    group = optimizer.param_groups[0]
    assert group.get("fused") or group.get("foreach")


def test_compiled_step_traces_once_per_step_shape_and_draws_the_same_numbers(tmp_path, monkeypatch):
    """The loss as compiled (dynamo, with its graphs run eagerly so that no C++ compiler is needed): Patch
    Diffusion's patch sizes each get their graphs once and nothing recompiles afterwards; the random draws
    stay outside the graphs, so the weights equal an eager run's bit for bit."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from conftest import TINY_METHODS
    from patchdiffusion.rng import keep_draws_out_of_compiled_graphs

    def dynamo_only(fn, dynamic=False):
        keep_draws_out_of_compiled_graphs()
        return torch.compile(fn, backend="eager", dynamic=dynamic)

    monkeypatch.setattr(train_module, "compile_function", dynamo_only)
    torch._dynamo.reset()
    counters.clear()
    settings = ["method=patch_diffusion", *TINY_METHODS["patch_diffusion"], "data.source=builtin:textures?count=32",
                "data.resolution=16", "train.batch_size=4", "train.steps=24", "train.sample_images=0",
                "train.device=cpu", "train.log_every=8"]
    shapes, graphs = [], []

    def watch(trainer):
        shapes.append(len(trainer.compile_watch["shapes"]))
        graphs.append(counters["stats"]["unique_graphs"])

    trainer = train_module.Trainer(apply_overrides(RunConfig(), settings + ["train.compile=on"]), tmp_path / "compiled",
                                   False, False, quiet)
    trainer.between_steps = watch
    try:
        trainer.run()
    finally:
        torch._dynamo.reset()
    assert shapes[-1] >= 2  # several patch sizes were seen
    settled = shapes.index(shapes[-1])
    assert graphs[settled:] == [graphs[settled]] * (len(graphs) - settled), (shapes, graphs)
    assert graphs[-1] <= 10 * shapes[-1]
    train(apply_overrides(RunConfig(), settings + ["train.compile=off"]), tmp_path / "eager", progress=False, log=quiet)
    assert_same(weights(tmp_path / "compiled", "net"), weights(tmp_path / "eager", "net"))


# ------------------------------------------------------------------------------------------------
# the benchmark's reference network


def test_bench_twin_matches_the_project_network_in_parameters_and_flops():
    """`patchdiff bench train-speed` compares like with like: diffusers' UNet2DModel built from the demo's
    net config has the project U-Net's parameter count within 0.1% and its FLOPs within 2%."""
    pytest.importorskip("diffusers")
    import importlib

    from torch.utils.flop_counter import FlopCounterMode

    from patchdiffusion.benchmarking import _benchmarks_package
    from patchdiffusion.methods import build_method
    from patchdiffusion.nets.unet import count_parameters

    _benchmarks_package()
    bench = importlib.import_module("benchmarks.train_speed")
    config = apply_overrides(RunConfig(), bench.NET)
    net = build_method(config.method, config.model, config.data.resolution, image_channels=3).build_network()
    twin = bench.diffusers_twin(config.model.net, config.data.resolution[0])
    ours, theirs = count_parameters(net), count_parameters(twin)
    assert abs(ours - theirs) / ours <= bench.PARAMETER_TOLERANCE, (ours, theirs)

    x, t = torch.randn(2, 3, 32, 32), torch.rand(2)
    with FlopCounterMode(display=False) as ours_count:
        net(x, t)
    with FlopCounterMode(display=False) as theirs_count:
        twin(x, (t * 999).long())
    ratio = ours_count.get_total_flops() / theirs_count.get_total_flops()
    assert 0.98 < ratio < 1.02, ratio

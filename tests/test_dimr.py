"""DiMR (Liu et al. 2024): preset sizes and FLOPs, TD norms, multi-resolution layout, loss, guidance, CLI."""

import math

import pytest
import torch

from patchdiffusion.config import ConfigError, RunConfig, apply_overrides
from patchdiffusion.methods import build_method
from patchdiffusion.methods.dimr import DiMRConfig, FinalOutput, multi_scale_targets
from patchdiffusion.nets.dimr import DiMRNet, complexity, dimr_config
from patchdiffusion.nets.tdln import (
    AdaLayerNorm,
    TDLayerNorm,
    TDRMSNorm,
    TimeDependentParameter,
    shared_time,
    time_coordinate,
)
from patchdiffusion.rng import SampleRNG, mix_seed
from patchdiffusion.sample import load_run
from patchdiffusion.train import train
from conftest import batch_of

QUIET = dict(progress=False, log=lambda *a: None)
TINY = [
    "data.source=builtin:digits?count=64",
    "data.resolution=16",
    "data.use_labels=true",
    "train.batch_size=4",
    "train.log_every=1",
    "train.warmup_steps=2",
    "train.sample_images=0",
    "train.device=cpu",
]


def tiny_config(*extra):
    config = apply_overrides(RunConfig(), ["method=dimr"])
    return apply_overrides(config, TINY + list(extra))


def tiny_net(**overrides):
    torch.manual_seed(0)
    return DiMRNet(dimr_config("dimr-tiny", canvas=(16, 16), **overrides))


def perturb_time_parameters(net, scale=0.5):
    """Make every time-dependent vector actually depend on time (p0 ≠ p1, nonzero w, b)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, TimeDependentParameter):
                for p in (m.p0, m.w, m.b):
                    p.add_(torch.randn(p.shape, generator=g) * scale)


# -- the paper's presets -------------------------------------------------------------------------


@pytest.mark.parametrize("name, params, gflops", [("dimr-xl-2r", 505e6, 160.0), ("dimr-g-2r", 1.06e9, 331.0)])
def test_presets_match_the_paper(name, params, gflops):
    """Parameters within 3% and forward GFLOPs (one multiply-add = one FLOP) within 10% on 32×32×4 latents."""
    c = complexity(dimr_config(name), 32, 32)
    print(f"{name}: {c['params'] / 1e6:.1f}M parameters (paper {params / 1e6:.0f}M), "
          f"{c['gflops']:.1f} GFLOPs (paper {gflops:.0f})")
    assert abs(c["params"] / params - 1) < 0.03
    assert abs(c["gflops"] / gflops - 1) < 0.10


def test_xl_layout_shapes_and_skips():
    """Branch 1: 39 blocks (19 + 1 + 19, 19 skip linears) on 256 + 1 tokens; branch 2: 20 -> 21 ConvNeXt
    blocks (10 skip linears); the upsampler sees 40 × 960 = 38 400 channels; outputs at 16² and 32²."""
    with torch.device("meta"):
        net = DiMRNet(dimr_config("dimr-xl-2r", canvas=(32, 32)))
        outputs = net(torch.zeros(2, 4, 32, 32), torch.zeros(2), torch.zeros(2, dtype=torch.long))
    low, high = net.stages
    assert (len(low.blocks), len(low.skips), len(high.blocks), len(high.skips)) == (39, 19, 21, 10)
    assert low.position.shape == (1, 16, 16, 960) and low.class_embed.num_embeddings == 1001
    assert high.class_embed is None and low.feature_dim == 38400
    assert high.upsample.shuffle.linear.in_features == 38400 and high.upsample.shuffle.linear.out_features == 4 * 480
    assert [tuple(o.shape) for o in outputs] == [(2, 4, 16, 16), (2, 4, 32, 32)]


# -- time-dependent norms -------------------------------------------------------------------------


def test_time_coordinate_is_the_reference_log_snr_over_4():
    t = torch.tensor([0.0, 499.0, 999.0])  # zero-based: n = t + 1
    torch.testing.assert_close(time_coordinate(t), ((t + 1) / 1000 * 8 - 4) / 4)
    assert float(time_coordinate(torch.tensor([999.0]))) == 1.0


def test_time_dependent_parameter_formula():
    p = TimeDependentParameter(6, 1.0)
    tau = torch.tensor([-1.0, 0.3, 1.0])
    assert torch.equal(p(tau), torch.ones(3, 6))  # p0 = p1 at init: no dependence on τ
    perturb = torch.nn.Module()
    perturb.p = p
    perturb_time_parameters(perturb)
    expected = p.p1 + torch.sigmoid((1 + p.w) * tau[:, None] + p.b) * (p.p0 - p.p1)
    torch.testing.assert_close(p(tau), expected)
    assert not torch.allclose(p(tau[:1]), p(tau[2:]))  # θ(−1) ≠ θ(1)
    # One shared τ: a single row, equal to every row of the per-example result.
    shared = p(shared_time(torch.full((5,), 0.3)))
    assert shared.shape == (1, 6) and shared_time(tau) is tau
    torch.testing.assert_close(shared[0], expected[1])


def test_td_norms_normalise_per_token_and_vary_with_time():
    torch.manual_seed(0)
    d = 32
    x = torch.randn(3, 7, d) * 5 + 2  # (B, tokens, d)
    tau = torch.tensor([-0.9, 0.0, 0.9])
    rms, ln = TDRMSNorm(d), TDLayerNorm(d)
    y = rms(x, tau)
    torch.testing.assert_close(y.square().mean(-1), torch.ones(3, 7), atol=1e-4, rtol=0)  # unit RMS per token
    z = ln(x, tau)
    torch.testing.assert_close(z.mean(-1), torch.zeros(3, 7), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.var(-1, unbiased=False), torch.ones(3, 7), atol=1e-3, rtol=0)
    for norm in (rms, ln):
        perturb_time_parameters(norm)
    # Scale (and shift) are θ(τ) of each example's own τ, applied to the normalised token.
    scale = rms.scale(tau)
    torch.testing.assert_close(rms(x, tau), scale[:, None] * y)
    weight, bias = ln.weight(tau), ln.bias(tau)
    torch.testing.assert_close(ln(x, tau), weight[:, None] * z + bias[:, None], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(rms(x, tau.flip(0)), rms(x, tau))
    # The batched path (one τ for all) equals the per-example path.
    same = torch.full((3,), 0.4)
    torch.testing.assert_close(ln(x, same), torch.stack([ln(x[i:i + 1], same[:1])[0] for i in range(3)]))


def test_td_norm_parameters_vs_adaln():
    """TD-RMSNorm 4d, TD-LayerNorm 8d, adaLN 2·d·E + 2d per norm; and for the whole XL model."""
    d, E = 960, 960
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert (count(TDRMSNorm(d)), count(TDLayerNorm(d)), count(AdaLayerNorm(d, E))) == (4 * d, 8 * d, 2 * d * E + 2 * d)
    td = complexity(dimr_config("dimr-xl-2r"), 32, 32)["params"]
    adaln = complexity(dimr_config("dimr-xl-2r", norm="adaln"), 32, 32)["params"]
    with torch.device("meta"):
        net = DiMRNet(dimr_config("dimr-xl-2r", canvas=(32, 32)))
    td_norm_params = sum(p.numel() for m in net.modules() if isinstance(m, TimeDependentParameter)
                         for p in m.parameters())
    print(f"XL/2R: TD norms hold {td_norm_params / 1e6:.2f}M parameters; the adaLN model has "
          f"{(adaln - td) / 1e6:.1f}M more ({adaln / 1e6:.1f}M vs {td / 1e6:.1f}M)")
    assert td_norm_params < 0.002 * td
    assert adaln - td > 100e6


def test_time_enters_only_through_the_norms():
    net = tiny_net().eval()
    x = torch.randn(2, 3, 16, 16)
    labels = torch.tensor([3, 7])
    with torch.no_grad():
        a, b = net(x, torch.tensor([10.0, 10.0]), labels), net(x, torch.tensor([900.0, 900.0]), labels)
    for u, v in zip(a, b):
        assert torch.equal(u, v)  # p0 = p1 at init: the network ignores t
    perturb_time_parameters(net)
    with torch.no_grad():
        a, b = net(x, torch.tensor([10.0, 10.0]), labels), net(x, torch.tensor([900.0, 900.0]), labels)
        mixed = net(x, torch.tensor([10.0, 900.0]), labels)
    assert not torch.allclose(a[-1], b[-1])
    torch.testing.assert_close(mixed[-1][0], a[-1][0], atol=1e-5, rtol=1e-5)  # per-example τ
    torch.testing.assert_close(mixed[-1][1], b[-1][1], atol=1e-5, rtol=1e-5)


def test_adaln_ablation_runs_and_uses_time():
    net = tiny_net(norm="adaln")
    assert net.time_embed is not None
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, AdaLayerNorm):
                m.modulation.weight.normal_(0, 0.1)
    x = torch.randn(2, 3, 16, 16)
    out = net(x, torch.tensor([10.0, 900.0]), torch.tensor([1, 2]))
    assert [tuple(o.shape) for o in out] == [(2, 3, 4, 4), (2, 3, 16, 16)]  # dimr-tiny: transformer on 4×4 patches
    out[-1].square().mean().backward()
    assert net.time_embed.mlp[0].weight.grad.abs().sum() > 0


# -- loss, sampling, guidance ---------------------------------------------------------------------


def test_multi_scale_targets_keep_unit_variance():
    noise = torch.randn(64, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    low, high = multi_scale_targets(noise, [(16, 16), (32, 32)])
    assert high is noise and low.shape == (64, 4, 16, 16)
    assert abs(float(low.std()) - 1) < 0.02
    torch.testing.assert_close(low[0, 0, 0, 0], noise[0, 0, :2, :2].sum() / 2)


def test_loss_is_the_weighted_sum_over_stages():
    method = build_method("dimr", DiMRConfig(), (16, 16))
    assert method.config.loss_weights == (0.25, 1.0) and method.config.label_dropout == 0.1
    betas = method.schedule.betas
    assert float(betas[0]) == pytest.approx(0.00085) and float(betas[-1]) == pytest.approx(0.012)
    net = method.build_network()
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    seeds = [mix_seed(4, k) for k in range(3)]
    loss = method.loss(net, batch_of(images, torch.tensor([1, 2, 3])), SampleRNG(seeds))
    # Redo the same draws by hand.
    rng = SampleRNG(seeds)
    labels = method.drop_labels(torch.tensor([1, 2, 3]), rng, 0.1)
    t = rng.randint(0, 1000).reshape(3)
    noise = rng.randn_like(images)
    ab = method.schedule.alphas_cumprod[t].float().view(3, 1, 1, 1)
    outputs = net(ab.sqrt() * images + (1 - ab).sqrt() * noise, t.float(), class_labels=labels)
    eps_low = torch.nn.functional.avg_pool2d(noise, 4) * 4  # dimr-tiny's first stage works at 4×4
    expected = 0.25 * (outputs[0] - eps_low).square().flatten(1).mean(1) + (outputs[1] - noise).square().flatten(1).mean(1)
    torch.testing.assert_close(loss, expected)


def test_guidance_convention_and_null_label():
    """--cfg-scale w: ε = ε_u + w(ε_c − ε_u); the reference's 0.4 (ε_c + 0.4(ε_c − ε_u)) is w = 1.4."""
    method = build_method("dimr", DiMRConfig(), (16, 16))
    net = tiny_net().eval()
    perturb_time_parameters(net)
    denoiser = method.denoiser(net)
    x = torch.randn(2, 3, 16, 16)
    sigma = torch.tensor([3.0, 3.0])
    labels = torch.tensor([4, 4])
    with torch.no_grad():
        guided = method.guided(denoiser, 1.4)(x, sigma, class_labels=labels)
        cond = denoiser(x, sigma, class_labels=labels)
        uncond = denoiser(x, sigma, class_labels=torch.full_like(labels, 10))  # null label = num_classes
        t = method.schedule.sigma_to_t(sigma).float()
        x_vp = x / (1 + sigma.view(-1, 1, 1, 1) ** 2).sqrt()
        eps_c = net(x_vp, t, labels)[-1]
        eps_u = net(x_vp, t, None)[-1]  # no labels = the null label
    eps = lambda x0: (x - x0) / sigma.view(-1, 1, 1, 1)  # noqa: E731  (EDM coordinates: x = x0 + σ ε)
    torch.testing.assert_close(eps(cond), eps_c, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(eps(uncond), eps_u, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(eps(guided), 1.4 * eps_c - 0.4 * eps_u, atol=1e-4, rtol=1e-4)


def test_final_output_wraps_lists_and_tensors():
    class One(torch.nn.Module):
        def forward(self, x, t, **cond):
            return x * 2

    x = torch.ones(1, 3, 4, 4)
    assert torch.equal(FinalOutput(One())(x, torch.zeros(1)), x * 2)
    assert FinalOutput(tiny_net())(torch.zeros(1, 3, 16, 16), torch.zeros(1)).shape == (1, 3, 16, 16)


def test_bad_configs_are_refused():
    with pytest.raises(ConfigError, match="loss_weights"):
        build_method("dimr", DiMRConfig(loss_weights=(1.0,)), (16, 16))
    with pytest.raises(ConfigError, match="not divisible"):
        build_method("dimr", DiMRConfig(), (15, 15))
    with pytest.raises(ConfigError, match="in_channels"):
        build_method("dimr", DiMRConfig(net=dimr_config("dimr-xl-2r")), (32, 32))
    method = build_method("dimr", DiMRConfig(), (16, 16))
    with pytest.raises(ConfigError, match="training size"):
        method.check_canvas(32, 32)
    with pytest.raises(ConfigError, match="label 12"):
        method.loss(method.build_network(), batch_of(torch.zeros(1, 3, 16, 16), torch.tensor([12])), SampleRNG([1]))


# -- training, resume, CLI, latents ---------------------------------------------------------------


def test_training_resume_and_sampling(tmp_path):
    one = tmp_path / "one"
    result = train(tiny_config("train.steps=4"), one, **QUIET)
    assert math.isfinite(result.last_loss)
    split = tmp_path / "split"
    train(tiny_config("train.steps=2"), split, **QUIET)
    train(tiny_config("train.steps=4"), split, resume=True, **QUIET)
    a, b = load_run(one, use_ema=False).net.state_dict(), load_run(split, use_ema=False).net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    loaded = load_run(one)
    rng = SampleRNG([mix_seed(3, i) for i in range(2)])
    labels = torch.tensor([3, 5])
    images = loaded.method.sample(loaded.net, rng, labels=labels, steps=4, guidance=3.0)
    again = loaded.method.sample(loaded.net, SampleRNG([mix_seed(3, i) for i in range(2)]), labels=labels, steps=4,
                                 guidance=3.0)
    assert images.shape == (2, 3, 16, 16) and torch.equal(images, again)


def test_cli_model_flag_and_cfg_scale(tmp_path, capsys):
    from patchdiffusion.cli import main

    run = tmp_path / "run"
    args = ["--data", "builtin:digits?count=32", "--resolution", "16", "--steps", "1", "--batch", "2",
            "--device", "cpu", "--no-progress", "data.use_labels=true", "train.sample_images=0"]
    assert main(["train", "--method", "dimr", "--model", "dimr-tiny", "--run", str(run), *args]) == 0
    assert load_run(run).config.model.net == dimr_config("dimr-tiny")
    out = tmp_path / "gen"
    assert main(["sample", "--run", str(run), "--class", "3", "--cfg-scale", "4", "--num", "2", "--steps", "2",
                 "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    assert len(list(out.glob("0*.png"))) == 2 and (out / "grid.png").is_file()
    capsys.readouterr()
    assert main(["train", "--method", "full", "--model", "dimr-tiny", "--run", str(tmp_path / "x"), *args]) == 2
    assert "no named architectures for --model (methods that have them: dimr)" in capsys.readouterr().err
    assert main(["train", "--method", "dimr", "--model", "dimr-s", "--run", str(tmp_path / "y"), *args]) == 2
    assert "choose from: dimr-xl-2r, dimr-g-2r, dimr-tiny" in capsys.readouterr().err


def test_latent_training_and_sampling(tiny_vae, tmp_path):
    config = tiny_config("data.resolution=32", "train.steps=2", "model.latent=true", f"model.vae_path={tiny_vae}",
                         "model.net.in_channels=4")
    result = train(config, tmp_path / "run", **QUIET)
    assert math.isfinite(result.last_loss)
    loaded = load_run(tmp_path / "run")
    assert loaded.method.canvas_size == (16, 16)
    images = loaded.method.sample(loaded.net, SampleRNG([1, 2]), labels=torch.tensor([0, 1]), steps=2)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()

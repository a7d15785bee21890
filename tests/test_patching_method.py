"""Luhman & Luhman 2022 (`--method patching`) against METHODS.md §3."""

import math

import pytest
import torch

from patchdiffusion.config import ConfigError, RunConfig, apply_overrides
from patchdiffusion.diffusion.losses import ddpm_loss_weight
from patchdiffusion.diffusion.samplers import ddpm_posterior_variance
from patchdiffusion.diffusion.schedules import VPSchedule
from patchdiffusion.methods import build_method
from patchdiffusion.methods.patching import PosteriorTables, learned_log_variance, variational_bound_bits
from patchdiffusion.rng import SampleRNG
from conftest import batch_of

SMALL_NET = [
    "method=patching", "model.net.model_channels=16", "model.net.channel_mult=[1,2]", "model.net.num_res_blocks=1",
    "model.net.attention_resolutions=[4]", "model.net.head_channels=16",
]


def make(resolution=32, *extra):
    config = apply_overrides(RunConfig(), SMALL_NET + [f"data.resolution={resolution}", *extra])
    return build_method("patching", config.model, config.data.resolution)


def test_defaults_follow_the_paper():
    method = make()
    assert method.config.net.patch_size == 4
    assert method.config.net.position_map and method.config.net.learn_sigma
    assert method.config.weighting == "sqrt_snr"
    assert method.default_sampler == "ddpm" and method.default_steps == 250
    betas = method.schedule.betas
    assert math.isclose(float(betas[0]), 1e-4, rel_tol=1e-6) and math.isclose(float(betas[-1]), 0.02, rel_tol=1e-6)
    net_cfg = method.network_config()
    assert net_cfg.time_embed_dim == 16 * 2  # model_channels · channel_mult[-1]


def test_sqrt_snr_weight():
    """w_t = sqrt(SNR_t): 1 where SNR = 1, and decreasing in t."""
    schedule = VPSchedule.linear(1000)
    w = ddpm_loss_weight(schedule.alphas_cumprod, "sqrt_snr")
    assert torch.all(w[1:] < w[:-1])
    t_snr1 = int(torch.argmin((schedule.alphas_cumprod / (1 - schedule.alphas_cumprod) - 1).abs()))
    alpha_bar = schedule.alphas_cumprod[t_snr1]
    assert math.isclose(float(ddpm_loss_weight(alpha_bar, "sqrt_snr")), math.sqrt(alpha_bar / (1 - alpha_bar)))
    assert math.isclose(float(ddpm_loss_weight(torch.tensor(0.5), "sqrt_snr")), 1.0)


def test_variance_interpolation_orientation():
    """v = 0 gives log β_t, v = 1 gives log β̃_t (the reverse of ADM)."""
    tables = PosteriorTables.of(VPSchedule.linear(1000))
    t = 500
    small, large = tables.log_var_small[t], tables.log_var_large[t]
    assert torch.isclose(learned_log_variance(torch.tensor(0.0), small, large), large)
    assert torch.isclose(learned_log_variance(torch.tensor(1.0), small, large), small)
    assert math.isclose(float(large), math.log(float(VPSchedule.linear(1000).betas[t])), rel_tol=1e-9)


def test_training_tables_agree_with_sampler_variances():
    """The VP per-step variances of training equal the sampler's σ-space ones scaled by ᾱ_{t−1}."""
    schedule = VPSchedule.linear(1000)
    tables = PosteriorTables.of(schedule)
    sig, ab = schedule.sigmas.double(), schedule.alphas_cumprod.double()
    for t in (5, 300, 999):
        small = ddpm_posterior_variance(float(sig[t]), float(sig[t - 1]), "small") * float(ab[t - 1])
        large = ddpm_posterior_variance(float(sig[t]), float(sig[t - 1]), "large") * float(ab[t - 1])
        assert math.isclose(small, math.exp(float(tables.log_var_small[t])), rel_tol=1e-6)
        assert math.isclose(large, math.exp(float(tables.log_var_large[t])), rel_tol=1e-6)


def test_vb_is_zero_for_the_true_posterior():
    """KL vanishes when x̂0 = x0 and the variance is β̃ (v = 1); it is positive otherwise."""
    tables = PosteriorTables.of(VPSchedule.linear(1000))
    x0 = torch.rand(3, 3, 8, 8) * 2 - 1
    x_t = torch.randn_like(x0)
    t = torch.tensor([10, 400, 999])
    exact = variational_bound_bits(tables, x0, x_t, t, x0, torch.ones_like(x0))
    assert torch.allclose(exact, torch.zeros(3), atol=1e-6)
    off = variational_bound_bits(tables, x0, x_t, t, x0 + 0.1, torch.zeros_like(x0))
    assert torch.all(off > 0)


def test_loss_trains_both_heads():
    method = make(16)
    torch.manual_seed(0)
    net = method.build_network()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    loss = method.loss(net, batch_of(images), SampleRNG([1, 2]))
    assert loss.shape == (2,) and torch.isfinite(loss).all()
    loss.mean().backward()
    # The mean head and the variance head both get gradients (the mean head is zero-initialised, so look at its conv)
    grads = {n: p.grad for n, p in net.named_parameters()}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "var" in n or "sigma" in n)
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("out"))


def test_sampling_shape_determinism_and_guidance():
    method = make(16, "model.net.num_classes=3")
    torch.manual_seed(0)
    net = method.build_network().eval()
    a = method.sample(net, SampleRNG([5, 6]), steps=10)
    b = method.sample(net, SampleRNG([5]), steps=10)
    assert a.shape == (2, 3, 16, 16)
    assert torch.allclose(a[:1], b, atol=1e-5)  # image i depends only on its seed
    c = method.sample(net, SampleRNG([5, 6]), steps=10, labels=torch.tensor([0, 2]), guidance=1.5)
    assert c.shape == a.shape and torch.isfinite(c).all()


def test_size_not_divisible_is_a_clear_error():
    with pytest.raises(ConfigError, match="not divisible by 8"):
        make(36)

"""Tests of the diffusion core: schedules, preconditioning, losses, samplers, guidance.

The samplers are checked on data with a known ideal denoiser: x0 ~ N(mu, s^2) independently per
element has D(x; sigma) = mu + s^2/(s^2 + sigma^2) (x - mu), so a correct sampler driven by it must
turn noise into samples with mean mu and std s.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from patchdiffusion.diffusion import (
    SAMPLERS,
    ClassifierFreeGuidance,
    DDPMLoss,
    DiscretePrecond,
    EDMLoss,
    EDMPrecond,
    VPSchedule,
    alpha_bar_to_sigma,
    ddpm_loss_weight,
    ddpm_posterior_variance,
    edm_coefficients,
    edm_loss_weight,
    edm_sigmas,
    eps_to_x0,
    get_sampler,
    guided,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_euler,
    sample_heun,
    schedule_from_name,
    sigma_to_alpha_bar,
    snr,
    v_to_eps,
    v_to_x0,
    vp_coefficients,
    x0_to_eps,
    x0_to_v,
)
from patchdiffusion.rng import SampleRNG

MU, S = 0.3, 0.5
SHAPE = (8, 1, 64, 64)  # 32768 elements: the sample std of stochastic runs is within ~0.4% of the true one
F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def gaussian_denoiser(x, sigma, **cond):
    """Ideal denoiser of x0 ~ N(MU, S^2) per element."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return MU + S**2 / (S**2 + sigma**2) * (x - MU)


def seeded_noise(seed: int):
    g = torch.Generator().manual_seed(seed)
    return lambda like, step: torch.randn(like.shape, generator=g, dtype=like.dtype)


def start_noise(sigma_max: float, seed: int = 0, standardize: bool = True) -> torch.Tensor:
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=F64)
    if standardize:  # take the sampling error of the start out of the statistics
        z = (z - z.mean()) / z.std()
    return z * sigma_max


def assert_gaussian(y: torch.Tensor, rel_std: float = 0.02, abs_mean: float = 0.02):
    assert torch.isfinite(y).all()
    mean, std = y.mean().item(), y.std().item()
    assert abs(mean - MU) < abs_mean, f"mean {mean:.4f} vs {MU}"
    assert abs(std / S - 1) < rel_std, f"std {std:.4f} vs {S}"


# ----------------------------------------------------------------------------------------------
# Schedules.


def test_edm_sigmas_follow_eq5():
    sigmas = edm_sigmas(18)
    assert sigmas.shape == (19,)
    assert sigmas[0].item() == pytest.approx(80.0)
    assert sigmas[-2].item() == pytest.approx(0.002)
    assert sigmas[-1].item() == 0
    assert (sigmas[:-1] > sigmas[1:]).all()
    rho = 7.0
    expected = (80 ** (1 / rho) + 5 / 17 * (0.002 ** (1 / rho) - 80 ** (1 / rho))) ** rho
    assert sigmas[5].item() == pytest.approx(expected, rel=1e-12)
    assert edm_sigmas(1).tolist() == [80.0, 0.0]


def test_sigma_alpha_bar_conversions():
    sigma = torch.tensor([0.01, 0.5, 1.0, 80.0], dtype=F64)
    ab = sigma_to_alpha_bar(sigma)
    torch.testing.assert_close(alpha_bar_to_sigma(ab), sigma, rtol=1e-12, atol=0)
    torch.testing.assert_close(snr(sigma), ab / (1 - ab), rtol=1e-12, atol=0)
    assert sigma_to_alpha_bar(1.0) == 0.5 and snr(2.0) == 0.25


def test_linear_schedule_endpoints_and_scaling():
    sch = VPSchedule.linear()
    assert sch.num_timesteps == 1000 and sch.betas.dtype == F64
    assert sch.betas[0].item() == pytest.approx(1e-4) and sch.betas[-1].item() == pytest.approx(0.02)
    torch.testing.assert_close(sch.alphas_cumprod, torch.cumprod(1 - sch.betas, 0))
    assert sch.sigma_max == pytest.approx(157.4, abs=0.1)
    half = VPSchedule.linear(T=500)  # ADM scales the endpoints by 1000/T
    assert half.betas[0].item() == pytest.approx(2e-4) and half.betas[-1].item() == pytest.approx(0.04)


def test_cosine_schedule():
    T, s = 1000, 0.008
    sch = VPSchedule.cosine(T)
    assert (sch.betas <= 0.999).all() and sch.betas.max().item() == pytest.approx(0.999)
    assert sch.alphas_cumprod[-1].item() < 1e-6
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 10, 500, 900):  # eq. 17, before the clipping of the last betas matters
        assert sch.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)


def test_other_schedules_and_names():
    sl = VPSchedule.scaled_linear()
    assert sl.betas[0].item() == pytest.approx(0.00085) and sl.betas[-1].item() == pytest.approx(0.012)
    assert sl.betas.sqrt().diff().std().item() < 1e-12  # linear in sqrt(beta)
    assert (VPSchedule.constant(beta=0.008).betas == 0.008).all()
    assert schedule_from_name("linear").betas[-1].item() == pytest.approx(0.02)
    assert schedule_from_name("linear0.025").betas[-1].item() == pytest.approx(0.025)
    assert schedule_from_name("cosine", 100).num_timesteps == 100
    assert schedule_from_name("scaled_linear").betas[-1].item() == pytest.approx(0.012)
    assert (schedule_from_name("const0.008").betas == 0.008).all()
    with pytest.raises(ValueError, match="cosine"):
        schedule_from_name("quadratic")


@pytest.mark.parametrize("name", ["linear", "cosine", "scaled_linear", "const0.008"])
def test_sigma_t_round_trip(name):
    sch = schedule_from_name(name)
    t = torch.linspace(0, 999, 1237, dtype=F64)
    torch.testing.assert_close(sch.sigma_to_t(sch.t_to_sigma(t)), t, rtol=0, atol=1e-8)
    torch.testing.assert_close(sch.sigma_to_t(sch.sigmas), torch.arange(1000, dtype=F64), rtol=0, atol=1e-8)
    torch.testing.assert_close(sch.t_to_sigma(torch.arange(1000)), sch.sigmas)
    assert (sch.sigmas.diff() > 0).all()
    # Out of range sigmas clamp to the ends; python numbers work too.
    assert sch.sigma_to_t(1e-9).item() == 0 and sch.sigma_to_t(1e9).item() == 999
    assert sch.sigma_to_t(torch.tensor([1.0])).dtype == torch.float32


def test_respacing_and_sampling_sigmas():
    sch = VPSchedule.linear()
    assert sch.respaced_timesteps(10).tolist() == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    ts = sch.respaced_timesteps(250)
    assert len(ts) == 250 and ts[0] == 0 and ts[-1] == 999
    assert sch.respaced_timesteps(1000).tolist() == list(range(1000))
    for n in (1, 25, 250, 1000):
        sig = sch.sigmas_for_sampling(n)
        assert sig.shape == (n + 1,)
        assert sig[-1] == 0 and (sig[:-1] > sig[1:]).all()
        assert sig[0].item() == pytest.approx(sch.sigma_max)


# ----------------------------------------------------------------------------------------------
# Preconditioning.


def test_edm_coefficients_at_points():
    sd = 0.5
    c_skip, c_out, c_in, c_noise = edm_coefficients(torch.tensor(sd, dtype=F64), sd)
    assert c_skip.item() == pytest.approx(0.5)
    assert c_out.item() == pytest.approx(sd / math.sqrt(2))
    assert c_in.item() == pytest.approx(1 / (sd * math.sqrt(2)))
    assert c_noise.item() == pytest.approx(math.log(sd) / 4)
    c_skip, c_out, c_in, c_noise = edm_coefficients(torch.tensor(2.0, dtype=F64), sd)
    assert c_skip.item() == pytest.approx(0.25 / 4.25)
    assert c_out.item() == pytest.approx(1.0 / math.sqrt(4.25))
    assert c_in.item() == pytest.approx(1 / math.sqrt(4.25))
    assert c_noise.item() == pytest.approx(math.log(2) / 4)
    assert edm_loss_weight(sd, sd) == pytest.approx(2 / sd**2) == pytest.approx(8.0)
    assert edm_loss_weight(2.0, sd) == pytest.approx(1 / c_out.item() ** 2)


def test_edm_precond_zero_net_gives_skip():
    seen = {}

    def zero_net(x_in, noise_labels, **cond):
        seen.update(x_in=x_in, noise_labels=noise_labels, cond=cond)
        return torch.zeros_like(x_in)

    D = EDMPrecond(zero_net, sigma_data=0.5)
    x = torch.randn(3, 2, 4, 4, dtype=F64)
    sigma = torch.tensor([0.1, 0.5, 3.0], dtype=F64)
    c_skip, _, c_in, c_noise = edm_coefficients(sigma.reshape(-1, 1, 1, 1), 0.5)
    torch.testing.assert_close(D(x, sigma, class_labels=None), c_skip * x)
    torch.testing.assert_close(seen["x_in"], c_in * x)
    torch.testing.assert_close(seen["noise_labels"], c_noise.flatten())
    assert seen["cond"] == {"class_labels": None}
    # A scalar sigma broadcasts over the batch.
    torch.testing.assert_close(D(x, 0.5), 0.5 * x)


def test_edm_precond_ideal_net_reproduces_denoiser_and_is_a_module():
    class IdealF(nn.Module):  # F = (D - c_skip x) / c_out, seen through c_in and c_noise
        def __init__(self):
            super().__init__()
            self.dummy = nn.Parameter(torch.zeros((), dtype=F64))

        def forward(self, x_in, noise_labels):
            sigma = (4 * noise_labels).exp().reshape(-1, 1, 1, 1)
            c_skip, c_out, c_in, _ = edm_coefficients(sigma, 0.5)
            x = x_in / c_in
            return (gaussian_denoiser(x, sigma) - c_skip * x) / c_out + self.dummy

    D = EDMPrecond(IdealF())
    x = torch.randn(4, 1, 8, 8, dtype=F64) * 3
    for sigma in (0.002, 0.3, 5.0, 80.0):
        torch.testing.assert_close(D(x, sigma), gaussian_denoiser(x, sigma))
    assert list(D.state_dict()) == ["net.dummy"]


def test_edm_precond_runs_net_in_its_dtype_and_mixes_in_float32():
    class BF16Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones((), dtype=torch.bfloat16))

        def forward(self, x_in, noise_labels):
            assert x_in.dtype == torch.bfloat16 and noise_labels.dtype == torch.float32
            return x_in * self.w

    out = EDMPrecond(BF16Net())(torch.randn(2, 3, 4, 4), torch.tensor([1.0, 2.0]))
    assert out.dtype == torch.float32


def test_parameterisation_round_trips():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(8, 3, 5, 5, generator=g, dtype=F64)
    eps = torch.randn(8, 3, 5, 5, generator=g, dtype=F64)
    ab = torch.rand(8, 1, 1, 1, generator=g, dtype=F64) * 0.98 + 0.01
    alpha, sigma = ab.sqrt(), (1 - ab).sqrt()
    x_t = alpha * x0 + sigma * eps
    v = alpha * eps - sigma * x0
    tol = dict(rtol=0, atol=1e-6)
    torch.testing.assert_close(eps_to_x0(x_t, eps, alpha, sigma), x0, **tol)
    torch.testing.assert_close(x0_to_eps(x_t, x0, alpha, sigma), eps, **tol)
    torch.testing.assert_close(x0_to_v(x_t, x0, alpha, sigma), v, **tol)
    torch.testing.assert_close(v_to_x0(x_t, v, alpha, sigma), x0, **tol)
    torch.testing.assert_close(v_to_eps(x_t, v, alpha, sigma), eps, **tol)
    torch.testing.assert_close(v_to_x0(x_t, x0_to_v(x_t, x0, alpha, sigma), alpha, sigma), x0, **tol)
    # vp_coefficients maps EDM's sigma to the same alpha_bar.
    a, s = vp_coefficients(alpha_bar_to_sigma(ab))
    torch.testing.assert_close(a, alpha)
    torch.testing.assert_close(s, sigma)


def analytic_vp_net(schedule: VPSchedule, prediction: str, extra_v: float | None = None):
    """A discrete-time VP net whose prediction comes from the ideal Gaussian denoiser."""

    def net(x_vp, t, **cond):
        sigma = schedule.t_to_sigma(t).reshape(-1, 1, 1, 1)
        alpha, sigma_vp = vp_coefficients(sigma)
        x0 = gaussian_denoiser(x_vp / alpha, sigma)
        out = {
            "eps": x0_to_eps(x_vp, x0, alpha, sigma_vp),
            "x0": x0,
            "v": x0_to_v(x_vp, x0, alpha, sigma_vp),
        }[prediction]
        return out if extra_v is None else torch.cat([out, torch.full_like(out, extra_v)], dim=1)

    return net


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_discrete_precond_reproduces_analytic_denoiser(prediction):
    sch = VPSchedule.linear()
    D = DiscretePrecond(analytic_vp_net(sch, prediction), sch, prediction=prediction)
    x = torch.randn(4, 2, 8, 8, dtype=F64) * 2
    # Table sigmas (integer t) and EDM sigmas in between (fractional t).
    for sigma in [*sch.sigmas_for_sampling(7)[:-1].tolist(), 0.05, 0.7, 12.0]:
        torch.testing.assert_close(D(x, sigma), gaussian_denoiser(x, sigma), rtol=1e-6, atol=1e-6)
    sigma = torch.tensor([0.05, 0.7, 12.0, 100.0], dtype=F64)
    torch.testing.assert_close(D(x, sigma), gaussian_denoiser(x, sigma), rtol=1e-6, atol=1e-6)


def test_discrete_precond_learned_variance_and_clipping():
    sch = VPSchedule.linear()
    D = DiscretePrecond(analytic_vp_net(sch, "eps", extra_v=0.25), sch, learned_variance=True, clip_x0=True)
    x = torch.randn(2, 3, 4, 4, dtype=F64) * 10
    x0, v = D(x, 10.0)
    assert x0.shape == v.shape == x.shape
    assert (v == 0.25).all()
    torch.testing.assert_close(x0, gaussian_denoiser(x, 10.0).clamp(-1, 1))
    with pytest.raises(ValueError, match="output channels"):
        DiscretePrecond(analytic_vp_net(sch, "eps"), sch, learned_variance=True)(x, 1.0)


# ----------------------------------------------------------------------------------------------
# Losses.


def test_edm_loss_draws_sigma_per_seed_and_weights():
    seen = {}

    def zero_denoiser(x, sigma, **cond):
        seen["sigma"] = sigma
        return torch.zeros_like(x)

    images = torch.randn(3, 2, 4, 4, dtype=F64)
    loss_fn = EDMLoss(P_mean=-1.2, P_std=1.2, sigma_data=0.5)
    loss = loss_fn(zero_denoiser, images, SampleRNG([10, 11, 12]))
    assert loss.shape == images.shape
    for b, seed in enumerate([10, 11, 12]):  # ln sigma = P_mean + P_std z, z the seed's first draw
        z = torch.randn((1, 1, 1), generator=torch.Generator().manual_seed(seed), dtype=F64).item()
        assert seen["sigma"][b].item() == pytest.approx(math.exp(-1.2 + 1.2 * z))
    weight = edm_loss_weight(seen["sigma"], 0.5).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(loss, weight * images**2)
    # An example's loss does not depend on its batch.
    alone = loss_fn(gaussian_denoiser, images[1:2], SampleRNG([11]))
    together = loss_fn(gaussian_denoiser, images, SampleRNG([10, 11, 12]))
    torch.testing.assert_close(alone[0], together[1])


def test_ddpm_loss_weights_at_points():
    ab = torch.tensor([0.5, 0.8], dtype=F64)  # SNR 1 and 4
    expect = {"none": [1, 1], "sqrt_snr": [1, 2], "snr": [1, 4], "snr+1": [2, 5], "truncated_snr": [1, 4]}
    for name, values in expect.items():
        for prediction in ("eps", "x0", "v"):
            torch.testing.assert_close(ddpm_loss_weight(ab, name, prediction), torch.tensor(values, dtype=F64))
    # P2 (Choi et al.): 1/(1 + SNR)^gamma on the eps loss; on the x0 loss Luhman's SNR sqrt(1 - alpha_bar).
    p2 = lambda pred, gamma=0.5: ddpm_loss_weight(ab, "p2", pred, p2_gamma=gamma)  # noqa: E731
    torch.testing.assert_close(p2("eps", 1.0), torch.tensor([0.5, 0.2], dtype=F64))
    torch.testing.assert_close(p2("x0"), ab / (1 - ab) * (1 - ab).sqrt())
    torch.testing.assert_close(p2("v"), torch.tensor([0.5 / 2**0.5, 0.8 / 5**0.5], dtype=F64))


def test_ddpm_loss_targets_and_details():
    sch = VPSchedule.linear()
    images = torch.randn(4, 3, 4, 4, dtype=F64)

    def zero_net(x_t, t, **cond):
        return torch.zeros(x_t.shape[0], 6, *x_t.shape[2:], dtype=x_t.dtype)  # 2C: learned variance

    loss, d = DDPMLoss(sch, prediction="eps")(zero_net, images, SampleRNG([1, 2, 3, 4]), return_details=True)
    assert loss.shape == images.shape
    assert d["t"].dtype == torch.long and ((d["t"] >= 0) & (d["t"] < 1000)).all()
    ab = sch.alphas_cumprod[d["t"]].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(d["x_t"], ab.sqrt() * images + (1 - ab).sqrt() * d["noise"])
    torch.testing.assert_close(loss, d["noise"] ** 2)
    assert d["output"].shape[1] == 6 and d["prediction"].shape[1] == 3
    loss_v = DDPMLoss(sch, prediction="v", loss_type="l1")(zero_net, images, SampleRNG([1, 2, 3, 4]))
    torch.testing.assert_close(loss_v, (ab.sqrt() * d["noise"] - (1 - ab).sqrt() * images).abs())


def test_ddpm_loss_weightings_relate_the_targets():
    """On an x0 loss, SNR weighting is the eps loss and SNR+1 the v loss (Salimans & Ho 2022)."""
    sch = VPSchedule.cosine()
    images = torch.randn(6, 2, 4, 4, dtype=F64)

    def eps_net(x_t, t):  # some imperfect eps prediction
        return 0.3 * x_t + 0.1 * t.reshape(-1, 1, 1, 1) / 1000

    def as_x0(x_t, t):
        ab = sch.alphas_cumprod[t.long()].reshape(-1, 1, 1, 1)
        return eps_to_x0(x_t, eps_net(x_t, t), ab.sqrt(), (1 - ab).sqrt())

    def as_v(x_t, t):
        ab = sch.alphas_cumprod[t.long()].reshape(-1, 1, 1, 1)
        return x0_to_v(x_t, as_x0(x_t, t), ab.sqrt(), (1 - ab).sqrt())

    seeds = list(range(6))
    eps_loss = DDPMLoss(sch, "eps")(eps_net, images, SampleRNG(seeds))
    x0_snr = DDPMLoss(sch, "x0", weighting="snr")(as_x0, images, SampleRNG(seeds))
    v_loss = DDPMLoss(sch, "v")(as_v, images, SampleRNG(seeds))
    x0_snr1 = DDPMLoss(sch, "x0", weighting="snr+1")(as_x0, images, SampleRNG(seeds))
    torch.testing.assert_close(x0_snr, eps_loss, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(x0_snr1, v_loss, rtol=1e-6, atol=1e-8)
    # P2 is defined on the eps loss, and means the same whatever is predicted.
    p2 = {pred: DDPMLoss(sch, pred, weighting="p2")(net, images, SampleRNG(seeds))
          for pred, net in (("eps", eps_net), ("x0", as_x0), ("v", as_v))}  # fmt: skip
    torch.testing.assert_close(p2["x0"], p2["eps"], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(p2["v"], p2["eps"], rtol=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------------------------
# Samplers on the analytic Gaussian case.


@pytest.mark.parametrize("sampler", [sample_heun, sample_dpmpp_2m])
def test_second_order_samplers_gaussian(sampler):
    sigmas = edm_sigmas(32)
    assert_gaussian(sampler(gaussian_denoiser, start_noise(80.0), sigmas))


def test_euler_gaussian():
    sigmas = edm_sigmas(256)
    assert_gaussian(sample_euler(gaussian_denoiser, start_noise(80.0), sigmas))


def test_stochastic_heun_gaussian():
    sigmas = edm_sigmas(64)
    x = start_noise(80.0, standardize=False)
    churn = dict(S_churn=10.0, S_min=0.05, S_max=50.0, S_noise=1.0)
    y = sample_heun(gaussian_denoiser, x, sigmas, noise_fn=seeded_noise(1), **churn)
    assert_gaussian(y)
    assert not torch.allclose(y, sample_heun(gaussian_denoiser, x, sigmas))  # the churn did something


@pytest.mark.parametrize(
    "sampler, options",
    [
        (sample_ddim, dict(eta=0.0)),
        (sample_ddim, dict(eta=1.0)),
        (sample_ddpm, dict(variance="small")),
        (sample_ddpm, dict(variance="large")),
    ],
)
def test_discrete_samplers_gaussian(sampler, options):
    sch = VPSchedule.linear()
    sigmas = sch.sigmas_for_sampling(1000)
    x = start_noise(sigmas[0].item(), standardize=False)
    assert_gaussian(sampler(gaussian_denoiser, x, sigmas, noise_fn=seeded_noise(3), **options))


def test_ddim_respaced_250_gaussian():
    sigmas = VPSchedule.linear().sigmas_for_sampling(250)
    assert_gaussian(sample_ddim(gaussian_denoiser, start_noise(sigmas[0].item()), sigmas))


def test_deterministic_samplers_converge_at_their_order():
    """The error against the exact ODE solution shrinks ~2x (Euler) / ~4x (Heun, DPM-Solver++(2M))
    when the steps double."""
    x = torch.full((1, 1, 1, 1), 80.0 + MU, dtype=F64)
    exact = MU + 80.0 * S / math.sqrt(S**2 + 80.0**2)

    def err(sampler, n):
        return abs(sampler(gaussian_denoiser, x, edm_sigmas(n)).item() - exact)

    for sampler, order in ((sample_euler, 1), (sample_heun, 2), (sample_dpmpp_2m, 2)):
        ratio = err(sampler, 32) / err(sampler, 64)
        assert 2**order * 0.8 < ratio < 2**order * 1.25, (sampler.__name__, ratio)


# ----------------------------------------------------------------------------------------------
# Samplers against the papers' algorithms written in VP coordinates.


def test_ddim_and_ddpm_match_vp_form_algorithms():
    """sigma-space DDIM (Song et al. eq. 12) and DDPM with ADM respacing agree with the VP-form
    updates over alpha_bar of the respaced timesteps."""
    sch = VPSchedule.linear()
    ts = sch.respaced_timesteps(20).flip(0)
    ab = sch.alphas_cumprod[ts].tolist() + [1.0]  # ... then the data at alpha_bar = 1
    sigmas = sch.sigmas_for_sampling(20)
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    zs = torch.randn(20, 2, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=F64)

    def next_z():
        it = iter(zs)
        return lambda like, step: next(it)

    def vp_ddim(eta):
        x = math.sqrt(ab[0]) * x_T * sigmas[0].item()  # the same start point, in VP coordinates
        for i in range(20):
            a_t, a_s = ab[i], ab[i + 1]
            x0 = gaussian_denoiser(x / math.sqrt(a_t), alpha_bar_to_sigma(a_t))
            eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
            c = eta * math.sqrt((1 - a_s) / (1 - a_t) * (1 - a_t / a_s))
            x = math.sqrt(a_s) * x0 + math.sqrt(1 - a_s - c**2) * eps + c * zs[i]
        return x

    def vp_ddpm(variance):
        x = math.sqrt(ab[0]) * x_T * sigmas[0].item()
        for i in range(20):
            a_t, a_s = ab[i], ab[i + 1]
            beta = 1 - a_t / a_s  # the respaced process's beta
            x0 = gaussian_denoiser(x / math.sqrt(a_t), alpha_bar_to_sigma(a_t))
            mean = beta * math.sqrt(a_s) / (1 - a_t) * x0 + (1 - a_s) * math.sqrt(1 - beta) / (1 - a_t) * x
            var = beta * (1 - a_s) / (1 - a_t) if variance == "small" else beta
            x = mean + (math.sqrt(var) * zs[i] if i < 19 else 0)
        return x

    x = x_T * sigmas[0].item()
    # The VE noise of a step is the VP one divided by sqrt(alpha_bar_s), so the same z's drive both.
    for eta in (0.0, 0.5, 1.0):
        ours = sample_ddim(gaussian_denoiser, x, sigmas, eta=eta, noise_fn=next_z())
        torch.testing.assert_close(ours, vp_ddim(eta), rtol=1e-9, atol=1e-9)
    for variance in ("small", "large"):
        ours = sample_ddpm(gaussian_denoiser, x, sigmas, variance=variance, noise_fn=next_z())
        torch.testing.assert_close(ours, vp_ddpm(variance), rtol=1e-9, atol=1e-9)


def test_dpmpp_2m_matches_vp_form_algorithm():
    """sigma-space DPM-Solver++(2M) agrees with Lu et al. 2022 Algorithm 2 in VP coordinates
    (alpha, sigma_vp, lambda = log alpha/sigma_vp), with a first-order final step to sigma = 0."""
    sigmas = edm_sigmas(12).tolist()
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=F64) * sigmas[0]
    alpha = [1 / math.sqrt(1 + s**2) for s in sigmas]
    sig_vp = [s * a for s, a in zip(sigmas, alpha)]
    lam = [math.log(a / s) if s > 0 else math.inf for a, s in zip(alpha, sig_vp)]

    x = alpha[0] * x_T
    prev = None
    for i in range(12):
        x0 = gaussian_denoiser(x / alpha[i], sigmas[i])
        if sigmas[i + 1] == 0:
            x = x0
            break
        h = lam[i + 1] - lam[i]
        if prev is None:
            D = x0
        else:
            r = (lam[i] - lam[i - 1]) / h
            D = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * prev
        x = sig_vp[i + 1] / sig_vp[i] * x - alpha[i + 1] * math.expm1(-h) * D
        prev = x0
    ours = sample_dpmpp_2m(gaussian_denoiser, x_T, torch.tensor(sigmas, dtype=F64))
    torch.testing.assert_close(ours, x, rtol=1e-10, atol=1e-10)


def test_ddim_eta0_is_euler_and_eta1_is_ddpm_small():
    sigmas = VPSchedule.linear().sigmas_for_sampling(50)
    x = start_noise(sigmas[0].item())[:2]
    torch.testing.assert_close(
        sample_ddim(gaussian_denoiser, x, sigmas), sample_euler(gaussian_denoiser, x, sigmas), rtol=1e-10, atol=1e-10
    )
    torch.testing.assert_close(
        sample_ddim(gaussian_denoiser, x, sigmas, eta=1.0, noise_fn=seeded_noise(5)),
        sample_ddpm(gaussian_denoiser, x, sigmas, variance="small", noise_fn=seeded_noise(5)),
        rtol=1e-10,
        atol=1e-10,
    )


def test_ddpm_variance_options():
    for sigma, sigma_next in ((157.0, 80.0), (1.0, 0.5), (0.05, 0.01)):
        small = ddpm_posterior_variance(sigma, sigma_next, "small")
        large = ddpm_posterior_variance(sigma, sigma_next, "large")
        assert small == pytest.approx(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
        assert large == pytest.approx((sigma**2 - sigma_next**2) * (1 + sigma_next**2) / (1 + sigma**2))
        assert 0 < small <= large
        v = torch.tensor([1.0, 0.0, 0.5], dtype=F64)
        learned = ddpm_posterior_variance(sigma, sigma_next, "learned", v)
        assert learned[0].item() == pytest.approx(small, rel=1e-12)
        assert learned[1].item() == pytest.approx(large, rel=1e-12)
        assert learned[2].item() == pytest.approx(math.sqrt(small * large), rel=1e-12)
    # In VP terms: small = beta_tilde / alpha_bar_s, large = beta' / alpha_bar_s.
    sch = VPSchedule.linear()
    t, s = 600, 400
    a_t, a_s = sch.alphas_cumprod[t].item(), sch.alphas_cumprod[s].item()
    sig_t, sig_s = sch.sigmas[t].item(), sch.sigmas[s].item()
    beta = 1 - a_t / a_s
    assert ddpm_posterior_variance(sig_t, sig_s, "large") == pytest.approx(beta / a_s, rel=1e-10)
    small = beta * (1 - a_s) / (1 - a_t) / a_s
    assert ddpm_posterior_variance(sig_t, sig_s, "small") == pytest.approx(small, rel=1e-10)


def test_ddpm_learned_variance_sampler():
    sigmas = VPSchedule.linear().sigmas_for_sampling(30)
    x = start_noise(sigmas[0].item())[:2]

    def with_v(value):
        return lambda x, sigma: (gaussian_denoiser(x, sigma), torch.full_like(x, value))

    for value, fixed in ((1.0, "small"), (0.0, "large")):
        torch.testing.assert_close(
            sample_ddpm(with_v(value), x, sigmas, variance="learned", noise_fn=seeded_noise(7)),
            sample_ddpm(gaussian_denoiser, x, sigmas, variance=fixed, noise_fn=seeded_noise(7)),
        )
    with pytest.raises(ValueError, match="learned"):
        sample_ddpm(gaussian_denoiser, x, sigmas, variance="learned")
    # Other samplers take x0 from a (x0, v) denoiser.
    sigmas = edm_sigmas(4)
    torch.testing.assert_close(sample_heun(with_v(0.5), x, sigmas), sample_heun(gaussian_denoiser, x, sigmas))


# ----------------------------------------------------------------------------------------------
# Determinism, plumbing, registry, guidance.


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_samplers_are_reproducible_per_seed(name):
    sampler = get_sampler(name)
    sigmas = edm_sigmas(8)
    options = {"heun": dict(S_churn=5.0), "euler": dict(S_churn=5.0), "ddim": dict(eta=1.0)}.get(name, {})

    def run(seeds):
        rng = SampleRNG(seeds)
        x = rng.randn(1, 4, 4, dtype=F64) * sigmas[0].item()
        return sampler(gaussian_denoiser, x, sigmas, noise_fn=rng.randn_like, **options)

    a, b = run([3, 4, 5]), run([3, 4, 5])
    assert torch.equal(a, b)
    torch.testing.assert_close(run([4])[0], a[1], rtol=1e-12, atol=1e-12)  # independent of the batch


def test_sampler_callback_extra_args_and_progress():
    calls = []

    def denoiser(x, sigma, class_labels=None):
        assert class_labels == "cat"
        return gaussian_denoiser(x, sigma)

    sigmas = edm_sigmas(5)
    x = torch.randn(2, 1, 4, 4, dtype=F64) * 80
    for name, sampler in SAMPLERS.items():
        calls.clear()
        sampler(denoiser, x, sigmas, extra_args={"class_labels": "cat"}, callback=calls.append, progress=True)
        assert [c["i"] for c in calls] == list(range(5)), name
        assert {"i", "x", "sigma", "denoised"} <= set(calls[0]) and calls[0]["sigma"] == pytest.approx(80.0)


def test_get_sampler():
    assert set(SAMPLERS) == {"euler", "heun", "ddim", "ddpm", "dpmpp_2m"}
    assert get_sampler("heun") is sample_heun
    with pytest.raises(ValueError, match="dpmpp_2m"):
        get_sampler("lms")


def test_classifier_free_guidance():
    batch_sizes = []

    def denoiser(x, sigma, class_labels=None, extra_channels=None):
        batch_sizes.append(x.shape[0])
        assert extra_channels.shape[0] == x.shape[0] and torch.as_tensor(sigma).shape[0] == x.shape[0]
        shift = class_labels.to(x.dtype).sum(dim=1).reshape(-1, 1, 1, 1)  # one-hot -> 1, null -> 0
        return x * 0.5 + shift, torch.full_like(x, 0.7) + shift

    x = torch.randn(3, 2, 4, 4, dtype=F64)
    labels = torch.eye(4)[[0, 2, 3]]
    cond = dict(class_labels=labels, extra_channels=torch.zeros(3, 2, 4, 4))
    sigma = torch.ones(3)
    for scale in (0.0, 1.0, 2.5):
        batch_sizes.clear()
        x0, v = guided(denoiser, scale)(x, sigma, **cond)
        torch.testing.assert_close(x0, x * 0.5 + scale)  # D_u + s (D_c - D_u) with D_c - D_u = 1
        torch.testing.assert_close(v, torch.full_like(x, 1.7))  # the conditional v
        assert batch_sizes == ([3] if scale == 1 else [6])  # both passes in one batch
    # Null values given as a tensor, and a scalar sigma.
    cfg = ClassifierFreeGuidance(lambda x, s, class_labels: x + class_labels.reshape(-1, 1, 1, 1), 3.0,
                                 {"class_labels": torch.tensor(10)})  # fmt: skip
    out = cfg(torch.zeros(2, 1, 1, 1), 1.0, class_labels=torch.tensor([1, 2]))
    torch.testing.assert_close(out.flatten(), torch.tensor([10 + 3 * (1 - 10), 10 + 3 * (2 - 10)], dtype=torch.float32))

"""The diffusion core: noise schedules, preconditioning (denoisers), losses, samplers, guidance.

Noise levels are EDM's sigma everywhere (``x = x0 + sigma * n``); see docs/architecture.md.
"""

from . import parameterization
from .guidance import ClassifierFreeGuidance, guided
from .losses import DDPMLoss, EDMLoss, ddpm_loss_weight, edm_loss_weight
from .precond import (
    DiscretePrecond,
    EDMPrecond,
    edm_coefficients,
    eps_to_x0,
    v_to_eps,
    v_to_x0,
    vp_coefficients,
    x0_to_eps,
    x0_to_v,
)
from .samplers import (
    SAMPLERS,
    ddpm_posterior_variance,
    get_sampler,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_euler,
    sample_heun,
)
from .schedules import (
    SCHEDULE_NAMES,
    VPSchedule,
    alpha_bar_to_sigma,
    edm_sigmas,
    schedule_from_name,
    sigma_to_alpha_bar,
    snr,
)

__all__ = [
    # schedules
    "edm_sigmas", "sigma_to_alpha_bar", "alpha_bar_to_sigma", "snr", "VPSchedule", "schedule_from_name",
    "SCHEDULE_NAMES",
    # preconditioning
    "edm_coefficients", "EDMPrecond", "DiscretePrecond", "vp_coefficients",
    "eps_to_x0", "x0_to_eps", "v_to_x0", "x0_to_v", "v_to_eps",
    # losses
    "edm_loss_weight", "EDMLoss", "ddpm_loss_weight", "DDPMLoss",
    # samplers
    "sample_euler", "sample_heun", "sample_ddim", "sample_ddpm", "sample_dpmpp_2m",
    "ddpm_posterior_variance", "SAMPLERS", "get_sampler",
    # guidance
    "ClassifierFreeGuidance", "guided",
]  # fmt: skip

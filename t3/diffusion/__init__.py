"""Rectified-flow objective, training timestep distributions, loss weights, per-sample seeds, the held-out
loss at fixed noise, and samplers for Wan-style models.

``sigma`` in ``[0, 1]`` is the noise level (0 = data, 1 = noise), ``x_t = (1 - sigma) x0 + sigma eps``,
the model predicts ``eps - x0`` and is fed ``timestep = sigma * num_train_timesteps``.
"""

from __future__ import annotations

from t3.diffusion.diffsynth_euler import DiffSynthFlowMatchEuler, diffsynth_sigmas
from t3.diffusion.flow_matching import (
    add_noise,
    flow_matching_loss,
    flow_matching_loss_at,
    shift_sigma,
    velocity_target,
)
from t3.diffusion.heldout import heldout_loss, heldout_noise, sample_seed
from t3.diffusion.sampling import SCHEDULER_NAMES, build_scheduler, sample
from t3.diffusion.timesteps import (
    TIMESTEP_SAMPLERS,
    LogitNormalSampler,
    ShiftedDiscreteSampler,
    ShiftedSampler,
    TimestepSampler,
    UniformSampler,
    build_timestep_sampler,
)
from t3.diffusion.weighting import LOSS_WEIGHTINGS, BellWeighting, build_loss_weighting

__all__ = [
    "LOSS_WEIGHTINGS",
    "SCHEDULER_NAMES",
    "TIMESTEP_SAMPLERS",
    "BellWeighting",
    "DiffSynthFlowMatchEuler",
    "LogitNormalSampler",
    "ShiftedDiscreteSampler",
    "ShiftedSampler",
    "TimestepSampler",
    "UniformSampler",
    "add_noise",
    "build_loss_weighting",
    "build_scheduler",
    "build_timestep_sampler",
    "diffsynth_sigmas",
    "flow_matching_loss",
    "flow_matching_loss_at",
    "heldout_loss",
    "heldout_noise",
    "sample",
    "sample_seed",
    "shift_sigma",
    "velocity_target",
]

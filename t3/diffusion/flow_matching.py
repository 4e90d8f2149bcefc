"""Rectified-flow (flow-matching) training objective of the Wan models.

Conventions (shared with diffusers' ``FlowMatchEulerDiscreteScheduler`` and the Wan models):

* ``sigma`` in ``[0, 1]`` is the noise level: ``sigma = 0`` is clean data, ``sigma = 1`` pure noise.
* The noisy sample is the straight-line interpolation ``x_t = (1 - sigma) * x0 + sigma * noise``.
* The network predicts the velocity ``dx_t / dsigma = noise - x0`` ("flow prediction").
* The network is conditioned on ``timestep = sigma * num_train_timesteps`` (so in ``[0, 1000]``).

Everything here is a pure function of its inputs; randomness only enters through an explicit
``torch.Generator`` so that losses are reproducible. How noise levels are drawn and losses weighted:
`t3.diffusion.timesteps` and `t3.diffusion.weighting`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch

logger = logging.getLogger(__name__)

#: ``model_fn(x_t, timestep=..., **cond) -> flow prediction`` (same shape as ``x_t``).
ModelFn = Callable[..., Any]
#: ``weighting(sigma[B]) -> weight[B]``: per-sample loss weight as a function of the noise level.
WeightingFn = Callable[[torch.Tensor], torch.Tensor]


class SigmaSampler(Protocol):
    """A training distribution over ``sigma``, e.g. a `t3.diffusion.timesteps.TimestepSampler`.

    Named here as a protocol, so that the objective does not import the distributions (which use
    `shift_sigma`): the dependency runs one way, ``timesteps`` -> ``flow_matching``.
    """

    def sample(
        self, batch_size: int, generator: torch.Generator | None, device: torch.device | str | None
    ) -> torch.Tensor:
        """Float32 ``[batch_size]`` noise levels in ``[0, 1]`` on ``device``."""
        ...


def shift_sigma(sigma: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """Applies the SD3 / Wan timestep shift ``shift * s / (1 + (shift - 1) * s)``.

    ``shift > 1`` moves probability mass (or schedule steps) towards high noise, which high-resolution
    and video models need because more pixels carry more redundant signal at a given noise level.
    The map is monotone on ``[0, 1]``, fixes both endpoints and is the identity for ``shift = 1``.

    Args:
        sigma: Noise level(s) in ``[0, 1]``; a tensor of any shape or a Python float.
        shift: Shift factor, must be ``> 0``.

    Returns:
        The shifted noise level(s), same type/shape as ``sigma``.

    Raises:
        ValueError: If ``shift <= 0``.
    """
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return shift * sigma / (1 + (shift - 1) * sigma)


def _per_sample(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Returns ``sigma`` as a float32 tensor of shape ``[B, 1, ..., 1]`` broadcastable against ``x``."""
    batch = x.shape[0]
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(batch)
    if sigma.shape != (batch,):
        raise ValueError(
            f"sigma must be a scalar or have shape [{batch}] (one per sample), got {tuple(sigma.shape)}"
        )
    return sigma.view(batch, *([1] * (x.ndim - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """Builds the noisy sample ``x_t = (1 - sigma) * x0 + sigma * noise``.

    Args:
        x0: Clean data, shape ``[B, ...]``.
        noise: Standard Gaussian noise, same shape as ``x0``.
        sigma: Noise level per sample, shape ``[B]`` (or a scalar shared by the batch).

    Returns:
        ``x_t`` in float32 (or wider, following type promotion), shape of ``x0``.
    """
    if noise.shape != x0.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)}")
    s = _per_sample(sigma, x0)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Returns the flow-matching regression target ``noise - x0`` (``d x_t / d sigma``)."""
    return noise - x0


def _unwrap_prediction(out: Any) -> torch.Tensor:
    """Accepts a bare tensor, a diffusers output object (``.sample``) or a ``return_dict=False`` tuple."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple | list):
        return out[0]
    if hasattr(out, "sample"):
        return out.sample
    raise TypeError(
        f"model_fn must return a tensor (or a diffusers output / tuple), got {type(out).__name__}"
    )


def flow_matching_loss_at(
    model_fn: ModelFn,
    x0: torch.Tensor,
    cond: Mapping[str, Any],
    sigmas: torch.Tensor | float,
    noise: torch.Tensor,
    *,
    num_train_timesteps: int = 1000,
    weighting: WeightingFn | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Flow-matching loss at given noise levels and noise; deterministic given its inputs.

    Use this for validation at fixed ``sigmas`` with fixed ``noise`` so that validation curves are
    comparable across steps and runs; :func:`flow_matching_loss` samples both and calls this.

    Args:
        model_fn: Called as ``model_fn(x_t, timestep=sigma * num_train_timesteps, **cond)``; returns the
            flow prediction with the shape of ``x0`` (any dtype). ``x_t`` is passed in ``x0.dtype``.
        x0: Clean latents, shape ``[B, ...]``.
        cond: Extra model kwargs (e.g. ``{"encoder_hidden_states": ...}``).
        sigmas: Noise level per sample, shape ``[B]`` or a scalar, in ``[0, 1]``.
        noise: Gaussian noise with the shape of ``x0``.
        num_train_timesteps: Scale from ``sigma`` to the model's ``timestep`` input.
        weighting: Optional per-sample weight ``w(sigma) -> [B]``; the loss becomes
            ``mean_b(w_b * mse_b)``. ``None`` is the plain MSE over all elements.

    Returns:
        ``(loss, info)``: ``loss`` is a float32 scalar with grad; ``info`` holds detached float32
        tensors ``sigma`` ``[B]``, ``timestep`` ``[B]`` and ``per_sample_loss`` ``[B]`` (unweighted MSE),
        handy for loss-vs-noise-level logging.
    """
    sigma = _per_sample(sigmas, x0).flatten()
    if bool(((sigma < 0) | (sigma > 1)).any()):
        raise ValueError(f"sigmas must lie in [0, 1], got min {sigma.min().item()} max {sigma.max().item()}")
    # The interpolation and target are formed in float32: bf16 latents would otherwise quantize the
    # (small) difference between neighbouring noise levels and the regression target.
    x0_f = x0.float()
    noise_f = noise.to(device=x0.device, dtype=torch.float32)
    x_t = add_noise(x0_f, noise_f, sigma)
    target = velocity_target(x0_f, noise_f)
    timestep = sigma * num_train_timesteps

    pred = _unwrap_prediction(model_fn(x_t.to(x0.dtype), timestep=timestep, **cond))
    if pred.shape != target.shape:
        raise ValueError(f"model prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")

    sq_err = (pred.float() - target).square()
    per_sample = sq_err.flatten(1).mean(dim=1)
    if weighting is None:
        loss = sq_err.mean()
    else:
        weights = torch.as_tensor(weighting(sigma), dtype=torch.float32, device=x0.device)
        if weights.shape != per_sample.shape:
            raise ValueError(
                f"weighting must return shape {tuple(per_sample.shape)}, got {tuple(weights.shape)}"
            )
        loss = (weights * per_sample).mean()

    info = {
        "sigma": sigma.detach(),
        "timestep": timestep.detach(),
        "per_sample_loss": per_sample.detach(),
    }
    return loss, info


def flow_matching_loss(
    model_fn: ModelFn,
    x0: torch.Tensor,
    cond: Mapping[str, Any],
    *,
    generator: torch.Generator | None,
    sampler: SigmaSampler,
    num_train_timesteps: int = 1000,
    weighting: WeightingFn | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Samples noise levels and noise, then returns the flow-matching loss (see :func:`flow_matching_loss_at`).

    Args:
        model_fn: Called as ``model_fn(x_t, timestep=sigma * num_train_timesteps, **cond)``.
        x0: Clean latents, shape ``[B, ...]``.
        cond: Extra model kwargs.
        generator: Source of randomness for both ``sigma`` and ``noise``. The noise is drawn on the
            generator's device (pass a CUDA generator to avoid a host-to-device copy of video-sized
            noise); ``None`` uses the global RNG on ``x0.device``.
        sampler: Training distribution of ``sigma`` (see :mod:`t3.diffusion.timesteps`).
        num_train_timesteps: Scale from ``sigma`` to the model's ``timestep`` input.
        weighting: Optional per-sample weight ``w(sigma) -> [B]``.

    Returns:
        ``(loss, info)`` as in :func:`flow_matching_loss_at`. The noise is not returned (it is
        video-sized); re-seed the generator to reproduce it.
    """
    batch = x0.shape[0]
    sigma = sampler.sample(batch, generator, x0.device)
    noise_device = generator.device if generator is not None else x0.device
    noise = torch.randn(x0.shape, generator=generator, device=noise_device, dtype=torch.float32)
    return flow_matching_loss_at(
        model_fn,
        x0,
        cond,
        sigma,
        noise.to(x0.device),
        num_train_timesteps=num_train_timesteps,
        weighting=weighting,
    )

"""Per-sample seeds, and the held-out flow-matching loss at fixed noise levels with fixed noise.

Randomness in training and validation is keyed by a sample's *position* (its index in the data stream or
the held-out set), never by the batch it lands in: `sample_seed` turns ``(seed, position, stream)`` into
the seed of that sample's generator, so a loss does not depend on how samples are split over GPUs and
micro-batches. ``stream`` keeps independent uses apart: 0 draws the training noise level and noise, and
held-out noise level ``k`` uses stream ``k + 1``.

`heldout_loss` is the validation recipe: every held-out sample at every level of ``sigmas``, with noise
fixed by its position, so values compare across steps, runs and models. The training module's
``val/loss`` and the CPU demo's held-out loss are both this function.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from t3.diffusion.flow_matching import ModelFn, flow_matching_loss_at

__all__ = ["heldout_loss", "heldout_noise", "sample_seed"]


def sample_seed(seed: int, position: int, stream: int = 0) -> int:
    """A 63-bit seed for the sample at ``position`` (``stream`` separates uses, e.g. validation)."""
    digest = hashlib.sha256(f"{seed}:{stream}:{position}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def heldout_noise(
    shape: Sequence[int], positions: Sequence[int], *, seed: int, level: int, device: torch.device | str
) -> torch.Tensor:
    """The fixed float32 noise ``[len(positions), *shape]`` of held-out samples at noise-level index ``level``."""
    return torch.stack(
        [
            torch.randn(
                tuple(shape),
                generator=torch.Generator(device=device).manual_seed(sample_seed(seed, p, stream=level + 1)),
                device=device,
                dtype=torch.float32,
            )
            for p in positions
        ]
    )


def heldout_loss(
    model_fn: ModelFn,
    x0: torch.Tensor,
    cond: Mapping[str, Any],
    positions: Sequence[int],
    *,
    sigmas: Sequence[float],
    seed: int,
    num_train_timesteps: int = 1000,
) -> torch.Tensor:
    """Unweighted flow-matching loss of each held-out sample at each fixed noise level, with fixed noise.

    Args:
        model_fn: As in `flow_matching_loss_at`.
        x0: Clean held-out latents ``[B, ...]``.
        cond: Extra model kwargs (``{"encoder_hidden_states": ...}``).
        positions: Each sample's index in the held-out set (its noise follows from it).
        sigmas: The noise levels.
        seed: Seed of the held-out noise (``validation.seed``).
        num_train_timesteps: Scale from ``sigma`` to the model's timestep input.

    Returns:
        Detached float32 ``[len(sigmas), B]``: the mean squared error of each sample at each level. Its
        mean over samples is the ``val/loss_sigma_<s>`` of a batch; the mean of those, ``val/loss``.
    """
    if len(positions) != len(x0):
        raise ValueError(f"{len(positions)} positions for a batch of {len(x0)} samples")
    losses = []
    for k, sigma in enumerate(sigmas):
        noise = heldout_noise(x0.shape[1:], positions, seed=seed, level=k, device=x0.device)
        _, info = flow_matching_loss_at(
            model_fn, x0, cond, float(sigma), noise, num_train_timesteps=num_train_timesteps
        )
        losses.append(info["per_sample_loss"])
    return torch.stack(losses)

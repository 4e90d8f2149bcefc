"""Per-sample loss weights as a function of the noise level (``WeightingFn`` of `t3.diffusion.flow_matching`).

* ``none``: every sample counts the same (plain MSE).
* ``bell``: DiffSynth-Studio's bell-shaped weight of the model timestep ``t = 1000 * sigma``, as the T3
  authors' pipeline trains with it (``FlowMatchScheduler.set_timesteps(1000, training=True)`` builds the
  table, ``WanVideoPipeline.training_loss`` multiplies the MSE by ``training_weight(timestep)``):

  ``y(t) = exp(-2 ((t - N/2) / N)^2)``, then ``w = (y - min y) * N / sum(y - min y)``,

  with the minimum and the sum over the ``N`` = 1000 timesteps of the training table, which are the
  *shifted* ones (``1000 * diffsynth_sigmas(1000, shift)``). So the ``N`` table weights sum to ``N`` (mean 1
  under the uniform index of ``shifted_discrete``), the weight peaks at ``t = 500`` and is 0 at the table's
  timestep farthest from 500 (``t = 1000``, pure noise). Checked against the same upstream files and commits
  as `t3.diffusion.diffsynth_euler`; computed with the upstream float32 operations, so a table sigma gets the
  upstream weight bit for bit. Other sigmas (e.g. from the continuous ``shifted`` sampler) get the same
  formula with the same normalisation.

Use :func:`build_loss_weighting` to get one from a config name.
"""

from __future__ import annotations

import dataclasses

import torch

from t3.diffusion.diffsynth_euler import diffsynth_sigmas
from t3.diffusion.flow_matching import WeightingFn

__all__ = ["LOSS_WEIGHTINGS", "BellWeighting", "build_loss_weighting"]

LOSS_WEIGHTINGS: tuple[str, ...] = ("none", "bell")


@dataclasses.dataclass(frozen=True)
class BellWeighting:
    """DiffSynth's bell-shaped timestep weight (see the module docstring).

    Attributes:
        shift: Shift of the training table's sigmas (the authors: 5).
        num_timesteps: ``N``: table size, centre ``N / 2`` and width of the bell (the authors: 1000).
        num_train_timesteps: Scale from ``sigma`` to the model's timestep (1000).
    """

    shift: float = 5.0
    num_timesteps: int = 1000
    num_train_timesteps: int = 1000

    def _bell(self, timestep: torch.Tensor) -> torch.Tensor:
        n = self.num_timesteps
        return torch.exp(-2 * ((timestep - n / 2) / n) ** 2)

    def _normalisation(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The table's timesteps, the bell's minimum over them and the factor that makes the weights sum to N."""
        timesteps = diffsynth_sigmas(self.num_timesteps, self.shift) * self.num_train_timesteps
        y = self._bell(timesteps)
        floor = y.min()
        return timesteps, floor, self.num_timesteps / (y - floor).sum()

    def table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The training table's timesteps and their weights, float32 ``[N]`` each."""
        timesteps, floor, scale = self._normalisation()
        return timesteps, (self._bell(timesteps) - floor) * scale

    def __call__(self, sigma: torch.Tensor) -> torch.Tensor:
        """Weights ``[B]`` of noise levels ``sigma`` ``[B]`` (float32, on ``sigma``'s device)."""
        _, floor, scale = self._normalisation()
        bell = self._bell(sigma.float() * self.num_train_timesteps)
        return (bell - floor.to(bell.device)) * scale.to(bell.device)


def build_loss_weighting(
    name: str, *, shift: float = 5.0, num_train_timesteps: int = 1000
) -> WeightingFn | None:
    """The loss weighting of a config name; ``None`` for ``none`` (plain MSE).

    Args:
        name: ``"none"`` or ``"bell"``.
        shift: Shift of the ``bell`` training table (``objective.flow_shift``).
        num_train_timesteps: Timestep scale, also the ``bell`` table size (DiffSynth uses 1000 for both).

    Raises:
        ValueError: For an unknown name.
    """
    key = name.strip().lower()
    if key == "none":
        return None
    if key == "bell":
        n = num_train_timesteps
        return BellWeighting(shift=shift, num_timesteps=n, num_train_timesteps=n)
    raise ValueError(f"unknown loss weighting {name!r}; expected one of {list(LOSS_WEIGHTINGS)}")

"""Training distributions over the noise level ``sigma`` in ``[0, 1]``.

Each sampler is a small frozen dataclass (hashable, printable, safe to put in a config) with
``sample(batch_size, generator, device) -> Tensor[B]`` in float32. All of them draw on the
generator's device (CPU when no generator is given) and then move the ``B`` values to ``device``,
so a CPU generator gives the same sigmas whatever device the model lives on.

* ``uniform``: ``sigma ~ U(0, 1)``.
* ``logit_normal``: ``sigma = sigmoid(N(mean, std))`` (SD3); concentrates on mid noise levels.
* ``shifted``: ``sigma = shift_sigma(U(0, 1), shift)`` with ``shift = 5``: the shifted schedule of Wan's
  sampler, drawn continuously; biases training towards high noise like the inference schedule does.
* ``shifted_discrete``: one of ``num_timesteps`` fixed sigmas, each with probability ``1 / num_timesteps``:
  ``shift_sigma(u)`` at ``u = 1, 1 - 1/N, ..., 1/N``. This is how the T3 authors' DiffSynth-Studio pipeline
  draws training timesteps (``FlowMatchScheduler.set_timesteps(1000, training=True)``, then
  ``timesteps[randint(0, 1000)]`` in ``WanVideoPipeline.training_loss``; the table is
  `t3.diffusion.diffsynth_sigmas`, where the upstream files and commit are named). One numerical difference:
  upstream casts the drawn timestep to its compute dtype (bfloat16) and then looks up the sigma and loss
  weight of the table entry nearest to the rounded value, so above ``t = 512`` (bfloat16 spacing 4, table
  spacing 0.2 to 1.8) it trains on fewer distinct noise levels with the same overall density; t3 keeps the
  drawn entry itself, in float32.

Use :func:`build_timestep_sampler` to construct one from a config name.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
from typing import Any

import torch

from t3.diffusion.diffsynth_euler import diffsynth_sigmas
from t3.diffusion.flow_matching import shift_sigma

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TimestepSampler(abc.ABC):
    """Base class: a distribution over ``sigma``, optionally clamped to ``[sigma_min, sigma_max]``.

    Attributes:
        sigma_min: Lower clamp, in ``[0, 1]``.
        sigma_max: Upper clamp, in ``[sigma_min, 1]``.
    """

    # kw_only so that subclasses can declare their own parameters positionally.
    sigma_min: float = dataclasses.field(default=0.0, kw_only=True)
    sigma_max: float = dataclasses.field(default=1.0, kw_only=True)

    def __post_init__(self) -> None:
        if not 0.0 <= self.sigma_min <= 1.0:
            raise ValueError(f"sigma_min must be in [0, 1], got {self.sigma_min}")
        if not self.sigma_min <= self.sigma_max <= 1.0:
            raise ValueError(f"sigma_max must be in [sigma_min={self.sigma_min}, 1], got {self.sigma_max}")

    @abc.abstractmethod
    def _sample_unclamped(
        self, batch_size: int, generator: torch.Generator | None, device: torch.device
    ) -> torch.Tensor:
        """Draws ``batch_size`` float32 sigmas in ``[0, 1]`` on ``device`` (the generator's device)."""

    def sample(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Draws one noise level per sample.

        Args:
            batch_size: Number of sigmas to draw.
            generator: Random generator; ``None`` uses torch's global CPU RNG.
            device: Device of the returned tensor (default: the generator's device, else CPU).

        Returns:
            Float32 tensor of shape ``[batch_size]`` with values in ``[sigma_min, sigma_max]``.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        draw_device = generator.device if generator is not None else torch.device("cpu")
        sigma = self._sample_unclamped(batch_size, generator, draw_device)
        sigma = sigma.clamp(self.sigma_min, self.sigma_max)
        return sigma.to(device if device is not None else draw_device)


@dataclasses.dataclass(frozen=True)
class UniformSampler(TimestepSampler):
    """``sigma ~ U(0, 1)``."""

    def _sample_unclamped(
        self, batch_size: int, generator: torch.Generator | None, device: torch.device
    ) -> torch.Tensor:
        return torch.rand(batch_size, generator=generator, device=device, dtype=torch.float32)


@dataclasses.dataclass(frozen=True)
class LogitNormalSampler(TimestepSampler):
    """``sigma = sigmoid(N(mean, std))``.

    Attributes:
        mean: Mean of the underlying normal (0 centres the mass at ``sigma = 0.5``).
        std: Standard deviation of the underlying normal, ``> 0``.
    """

    mean: float = 0.0
    std: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.std > 0:
            raise ValueError(f"std must be > 0, got {self.std}")

    def _sample_unclamped(
        self, batch_size: int, generator: torch.Generator | None, device: torch.device
    ) -> torch.Tensor:
        z = torch.randn(batch_size, generator=generator, device=device, dtype=torch.float32)
        return torch.sigmoid(self.mean + self.std * z)


@dataclasses.dataclass(frozen=True)
class ShiftedSampler(TimestepSampler):
    """``sigma = shift * u / (1 + (shift - 1) * u)`` with ``u ~ U(0, 1)``: the sampler's shifted schedule, drawn continuously.

    Attributes:
        shift: Shift factor, ``> 0``; ``1`` is uniform, ``> 1`` favours high noise.
    """

    shift: float = 5.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.shift > 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")

    def _sample_unclamped(
        self, batch_size: int, generator: torch.Generator | None, device: torch.device
    ) -> torch.Tensor:
        u = torch.rand(batch_size, generator=generator, device=device, dtype=torch.float32)
        return shift_sigma(u, self.shift)


@dataclasses.dataclass(frozen=True)
class ShiftedDiscreteSampler(TimestepSampler):
    """One of the ``num_timesteps`` DiffSynth sigmas ``diffsynth_sigmas(num_timesteps, shift)``, uniformly.

    Attributes:
        shift: Shift factor, ``> 0`` (the authors: 5).
        num_timesteps: Size of the table (the authors: 1000, the model's timestep scale).
    """

    shift: float = 5.0
    num_timesteps: int = 1000

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.shift > 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")
        if self.num_timesteps < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {self.num_timesteps}")

    def _sample_unclamped(
        self, batch_size: int, generator: torch.Generator | None, device: torch.device
    ) -> torch.Tensor:
        index = torch.randint(0, self.num_timesteps, (batch_size,), generator=generator, device=device)
        return diffsynth_sigmas(self.num_timesteps, self.shift).to(device)[index]


_SAMPLERS: dict[str, type[TimestepSampler]] = {
    "uniform": UniformSampler,
    "logit_normal": LogitNormalSampler,
    "shifted": ShiftedSampler,
    "shifted_discrete": ShiftedDiscreteSampler,
}


#: The config names of the samplers (``objective.timestep_sampler``).
TIMESTEP_SAMPLERS: tuple[str, ...] = tuple(_SAMPLERS)


def build_timestep_sampler(name: str, **kwargs: Any) -> TimestepSampler:
    """Builds a timestep sampler from its config name.

    Args:
        name: One of ``"uniform"``, ``"logit_normal"``, ``"shifted"``, ``"shifted_discrete"`` (``-`` is
            accepted for ``_``).
        **kwargs: The sampler's parameters (e.g. ``shift=5.0``, ``mean=0.0, std=1.0``) and the
            optional clamps ``sigma_min`` / ``sigma_max``.

    Returns:
        The sampler.

    Raises:
        ValueError: For an unknown name, an unknown parameter, or a parameter out of range.
    """
    key = name.strip().lower().replace("-", "_")
    if key not in _SAMPLERS:
        raise ValueError(f"unknown timestep sampler {name!r}; expected one of {sorted(_SAMPLERS)}")
    cls = _SAMPLERS[key]
    accepted = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {unknown} for timestep sampler {key!r}; accepted: {sorted(accepted)}"
        )
    sampler = cls(**kwargs)
    logger.debug("built timestep sampler %s", sampler)
    return sampler

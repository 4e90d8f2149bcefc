"""DiffSynth-Studio's flow-matching Euler sampler: how the T3 authors generate their videos.

The authors' code is a DiffSynth-Studio fork. Its Wan pipeline (``diffsynth/pipelines/wan_video_new.py``,
``WanVideoPipeline``) builds ``FlowMatchScheduler(shift=5, sigma_min=0.0, extra_one_step=True)``
(``diffsynth/schedulers/flow_match.py``) and, for ``num_inference_steps`` steps with ``sigma_shift = 5``:

* ``u = linspace(1, 0, steps + 1)[:-1]``: ``steps`` evenly spaced points of ``(0, 1]``, the 0 left out;
* ``sigma = shift * u / (1 + (shift - 1) * u)``, and the DiT is fed ``timestep = 1000 * sigma``;
* step ``i``: ``x <- x + v * (sigma_next - sigma)`` with ``sigma_next = sigma[i + 1]``, and ``0`` after the last
  step: plain first-order Euler.

Checked against zhangzjn/T3-Video at commit 6bfaf713ae2179ab83af4f855fd0b70b53cf87cb (its
``infer_multi_gpu.py`` calls the pipeline with these defaults), whose two files equal
modelscope/DiffSynth-Studio's at commit 5cee326f92e9afce4084fcf9358b3bb927a34a6f where they matter (the
scheduler file is identical; the fork ships no training script, DiffSynth-Studio's
``examples/wanvideo/model_training/train.py`` at that commit calls ``set_timesteps(1000, training=True)``,
see `t3.diffusion.timesteps` and `t3.diffusion.weighting`). Only the facts above are taken; the code is t3's.

diffusers' ``FlowMatchEulerDiscreteScheduler`` with the same shift does not give these sigmas: it spaces ``u``
over ``[1, shift(1 / 1000)]``, ends included, before shifting, so at 50 steps its last non-zero sigma is
``shift(shift(0.001))`` = 0.024 where DiffSynth's is ``shift(1 / 50)`` = 0.093, and the ones in between differ too.

Two numerical differences from the authors' pipeline, both deliberate and shared with every t3 sampler
(`t3.diffusion.sample`): the latents stay float32 between steps, and the DiT gets the timestep in float32
(the DiffSynth pipeline casts it to its compute dtype first; in bfloat16 that rounds timesteps above 512 to a
multiple of 4).

The class speaks the diffusers scheduler protocol (``set_timesteps``, ``timesteps``, ``sigmas``, ``step``,
``set_begin_index``, ``order``), so `t3.diffusion.sample` and diffusers' ``WanPipeline`` can both drive it.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput

__all__ = ["DiffSynthFlowMatchEuler", "diffsynth_sigmas"]


def diffsynth_sigmas(num_steps: int, shift: float) -> torch.Tensor:
    """The ``num_steps`` noise levels of DiffSynth's ``FlowMatchScheduler`` (``extra_one_step=True``, ``sigma_min=0``).

    Computed in float32 with the upstream operations, so the values are the upstream values bit for bit.

    Args:
        num_steps: Number of sampler steps (also the size of the training table, see `t3.diffusion.timesteps`).
        shift: Timestep shift, ``> 0``.

    Returns:
        Float32 ``[num_steps]``, decreasing from 1.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    u = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float32)[:-1]
    return shift * u / (1 + (shift - 1) * u)


class DiffSynthFlowMatchEuler(SchedulerMixin, ConfigMixin):
    """Euler steps over DiffSynth's shifted sigmas (see the module docstring).

    Args:
        num_train_timesteps: Scale from ``sigma`` to the model's timestep (1000).
        shift: Timestep shift (the authors: 5).
    """

    _compatibles: list[str] = []
    order = 1
    init_noise_sigma = 1.0

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, shift: float = 5.0) -> None:
        if num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
        if not shift > 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        self.sigmas = torch.zeros(0)
        self.timesteps = torch.zeros(0)
        self.num_inference_steps: int | None = None
        self._begin_index: int | None = None
        self._step_index: int | None = None

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        """Sets ``timesteps`` (``[steps]``) and ``sigmas`` (``[steps + 1]``, the last one 0) for a run."""
        sigmas = diffsynth_sigmas(num_inference_steps, self.config.shift)
        self.timesteps = (sigmas * self.config.num_train_timesteps).to(device)
        self.sigmas = torch.cat([sigmas, sigmas.new_zeros(1)]).to(device)
        self.num_inference_steps = num_inference_steps
        self._begin_index = None
        self._step_index = None

    def set_begin_index(self, begin_index: int = 0) -> None:
        """The index of the first step taken (0 for generation from pure noise)."""
        self._begin_index = begin_index

    def scale_model_input(self, sample: torch.Tensor, timestep: torch.Tensor | None = None) -> torch.Tensor:
        """Flow matching feeds the latents unscaled."""
        return sample

    def _index_of(self, timestep: torch.Tensor | float) -> int:
        # As upstream: the step whose timestep is nearest to the one given.
        t = torch.as_tensor(timestep, dtype=torch.float32).to(self.timesteps.device)
        return int((self.timesteps - t).abs().argmin())

    def step(
        self,
        model_output: torch.Tensor,
        timestep: torch.Tensor | float,
        sample: torch.Tensor,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple[torch.Tensor]:
        """One Euler step ``sample + model_output * (sigma_next - sigma)``.

        Args:
            model_output: The flow prediction ``v`` at ``sample``.
            timestep: An entry of ``timesteps`` (used to find the step when no begin index is set).
            sample: The current latents.
            return_dict: diffusers' convention: a ``SchedulerOutput`` if True, else ``(x,)``.
        """
        if self.num_inference_steps is None:
            raise RuntimeError("call set_timesteps() before step()")
        if self._step_index is None:
            self._step_index = self._index_of(timestep) if self._begin_index is None else self._begin_index
        i = self._step_index
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        prev = sample + model_output * (sigma_next - sigma).to(sample.device)
        self._step_index = i + 1
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

"""Inference: flow-matching samplers (diffusers schedulers) with classifier-free guidance.

The loop mirrors diffusers' ``WanPipeline.__call__`` (``set_timesteps`` then one ``scheduler.step``
per entry of ``scheduler.timesteps``) but is model-agnostic: ``model_fn(x, timestep, **kwargs)``
returns the flow prediction. Differences from the pipeline, all deliberate:

* the conditional and unconditional passes are batched into one forward by default;
* the latent state stays in float32 between steps (only the model input is cast to ``dtype``);
* initial noise is always drawn on CPU so a seed gives the same latents on any device.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from tqdm import tqdm

from t3.diffusion.diffsynth_euler import DiffSynthFlowMatchEuler
from t3.diffusion.flow_matching import ModelFn, _unwrap_prediction

logger = logging.getLogger(__name__)

SCHEDULER_NAMES: tuple[str, ...] = ("diffsynth_euler", "euler", "unipc")

#: ``callback(step_index, timestep, latents)``; may return replacement latents (or ``None``).
StepCallback = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor | None]


def build_scheduler(name: str, num_train_timesteps: int = 1000, flow_shift: float = 5.0) -> SchedulerMixin:
    """Builds a flow-matching scheduler: the T3 authors' one, or one configured as diffusers' Wan pipelines use it.

    * ``"diffsynth_euler"``: DiffSynth-Studio's Euler over ``steps`` evenly spaced shifted sigmas of ``(0, 1]``
      (`t3.diffusion.diffsynth_euler`), what the T3 authors' pipeline samples with.
    * ``"euler"``: ``FlowMatchEulerDiscreteScheduler(shift=flow_shift)`` (first-order; the WanPipeline
      class default).
    * ``"unipc"``: ``UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
      flow_shift=flow_shift)`` with the remaining settings at the values of the released
      ``Wan-AI/Wan2.1-*-Diffusers`` scheduler configs (which equal the diffusers defaults: order-2
      ``bh2`` solver, ``final_sigmas_type="zero"``, ``lower_order_final=True``).

    Wan's recommendation is ``flow_shift`` 5.0 for 720p and 3.0 for 480p; larger for higher resolution.

    Args:
        name: ``"diffsynth_euler"``, ``"euler"`` or ``"unipc"`` (case-insensitive).
        num_train_timesteps: Scale between ``sigma`` in ``[0, 1]`` and model timesteps.
        flow_shift: Timestep shift of the inference schedule, ``> 0``.

    Returns:
        A freshly constructed scheduler (stateful: do not share one across concurrent loops).

    Raises:
        ValueError: For an unknown name or out-of-range parameter.
    """
    key = name.strip().lower()
    if flow_shift <= 0:
        raise ValueError(f"flow_shift must be > 0, got {flow_shift}")
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    if key == "diffsynth_euler":
        return DiffSynthFlowMatchEuler(num_train_timesteps=num_train_timesteps, shift=flow_shift)
    if key == "euler":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=flow_shift)
    if key == "unipc":
        return UniPCMultistepScheduler(
            num_train_timesteps=num_train_timesteps,
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=flow_shift,
            solver_order=2,
            solver_type="bh2",
            predict_x0=True,
            lower_order_final=True,
            final_sigmas_type="zero",
        )
    raise ValueError(f"unknown scheduler {name!r}; expected one of {list(SCHEDULER_NAMES)}")


def _initial_noise(
    shape: Sequence[int],
    generator: torch.Generator | Sequence[torch.Generator] | None,
) -> torch.Tensor:
    """Draws float32 N(0, 1) noise on CPU, one generator per sample if a list is given."""
    shape = tuple(int(s) for s in shape)
    if isinstance(generator, Sequence):
        if len(generator) != shape[0]:
            raise ValueError(
                f"got {len(generator)} generators for a batch of {shape[0]}; pass one per sample"
            )
        gens = list(generator)
    else:
        gens = [generator]
    for g in gens:
        # A CUDA generator would give device-dependent noise, defeating seed reproducibility.
        if g is not None and g.device.type != "cpu":
            raise ValueError(f"generator must be a CPU torch.Generator, got one on {g.device}")
    if len(gens) == 1:
        return torch.randn(shape, generator=gens[0], dtype=torch.float32)
    return torch.cat([torch.randn((1, *shape[1:]), generator=g, dtype=torch.float32) for g in gens])


def _concat_conditions(uncond: Mapping[str, Any], cond: Mapping[str, Any]) -> dict[str, Any]:
    """Stacks ``[uncond, cond]`` along the batch dimension, key by key, for one CFG forward."""
    if set(uncond) != set(cond):
        raise ValueError(f"cond and uncond must have the same keys, got {sorted(cond)} vs {sorted(uncond)}")
    merged: dict[str, Any] = {}
    for key, c in cond.items():
        u = uncond[key]
        if isinstance(c, torch.Tensor):
            if not isinstance(u, torch.Tensor) or u.shape[1:] != c.shape[1:]:
                got = tuple(u.shape) if isinstance(u, torch.Tensor) else type(u).__name__
                raise ValueError(
                    f"cannot batch {key!r} for CFG: cond has shape {tuple(c.shape)}, uncond {got} "
                    "(all dimensions but the batch must match; pad to a common length, or use batch_cfg=False)"
                )
            merged[key] = torch.cat([u, c])
        elif u is c or u == c:
            # Non-tensor kwargs (e.g. attention_kwargs) are shared by both halves.
            merged[key] = c
        else:
            raise ValueError(f"non-tensor kwarg {key!r} differs between cond and uncond; use batch_cfg=False")
    return merged


@torch.no_grad()
def sample(
    model_fn: ModelFn,
    latents_shape: Sequence[int],
    cond: Mapping[str, Any],
    uncond: Mapping[str, Any] | None = None,
    *,
    scheduler: SchedulerMixin,
    num_steps: int,
    guidance_scale: float,
    generator: torch.Generator | Sequence[torch.Generator] | None,
    dtype: torch.dtype,
    device: torch.device | str,
    progress: bool = True,
    callback: StepCallback | None = None,
    batch_cfg: bool = True,
    latents: torch.Tensor | None = None,
) -> torch.Tensor:
    """Integrates the learned flow from noise (``sigma = 1``) to data (``sigma = 0``).

    Classifier-free guidance: with ``uncond`` given and ``guidance_scale > 1``, the prediction is
    ``v_uncond + guidance_scale * (v_cond - v_uncond)``. By default both halves run in ONE forward on a
    batch of ``2B`` (``[uncond; cond]``), which is faster than two passes but needs twice the
    activation memory; ``batch_cfg=False`` runs two forwards of ``B`` instead.

    Args:
        model_fn: Called as ``model_fn(x, timestep, **kwargs)`` with ``x`` of shape ``[N, ...]`` in
            ``dtype`` and ``timestep`` of shape ``[N]`` (``scheduler.timesteps`` entries, so on the
            ``[0, num_train_timesteps]`` scale); returns the flow prediction with the shape of ``x``
            (a diffusers output object or ``return_dict=False`` tuple is also accepted).
        latents_shape: Shape of the latents, ``[B, C, F, H, W]`` for Wan (any ``[B, ...]`` works).
        cond: Conditional model kwargs, e.g. ``{"encoder_hidden_states": [B, L, D]}``; tensors must
            already be on ``device`` with batch size ``B``.
        uncond: Unconditional (negative-prompt) kwargs with the same keys and shapes, or ``None``.
        scheduler: A flow-matching diffusers scheduler, e.g. from :func:`build_scheduler`; its state is
            reset here, so it can be reused across calls (but not concurrently).
        num_steps: Number of inference steps (model evaluations per CFG branch).
        guidance_scale: CFG scale; ``<= 1`` (or ``uncond=None``) runs the conditional pass only.
        generator: CPU ``torch.Generator`` for the initial noise, or a list with one per sample
            (so a sample's noise does not depend on its position in the batch); ``None`` uses the
            global CPU RNG.
        dtype: Dtype of the model input (e.g. ``torch.bfloat16``); the latent state stays float32.
        device: Device the model runs on.
        progress: Show a tqdm progress bar over steps.
        callback: Optional ``callback(step_index, timestep, latents)`` called after each step with the
            updated float32 latents; if it returns a tensor, that replaces the latents.
        batch_cfg: Batch the CFG passes into one forward (default) or run them separately.
        latents: Optional initial noise of shape ``latents_shape`` (overrides ``generator``).

    Returns:
        The final latents, float32, shape ``latents_shape``, on ``device``.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    device = torch.device(device)
    if latents is None:
        latents = _initial_noise(latents_shape, generator)
    elif tuple(latents.shape) != tuple(latents_shape):
        raise ValueError(f"latents shape {tuple(latents.shape)} != latents_shape {tuple(latents_shape)}")
    latents = latents.to(device=device, dtype=torch.float32)
    batch = latents.shape[0]

    use_cfg = uncond is not None and guidance_scale > 1.0
    if uncond is not None and not use_cfg:
        logger.debug(
            "guidance_scale=%s <= 1: ignoring uncond and running the conditional pass only", guidance_scale
        )
    cfg_kwargs = _concat_conditions(uncond, cond) if use_cfg and batch_cfg else None

    scheduler.set_timesteps(num_steps, device=device)
    # As in WanPipeline: lets the scheduler index steps without a device->host sync per step.
    scheduler.set_begin_index(0)
    timesteps = scheduler.timesteps
    logger.info(
        "sampling %s: %d steps with %s, guidance %.2f (%s)",
        tuple(latents.shape),
        len(timesteps),
        type(scheduler).__name__,
        guidance_scale,
        ("batched" if batch_cfg else "two passes") if use_cfg else "no CFG",
    )

    for i, t in enumerate(tqdm(timesteps, desc="sampling", disable=not progress, leave=False)):
        x_in = latents.to(dtype)
        if not use_cfg:
            pred = _unwrap_prediction(model_fn(x_in, t.expand(batch), **cond)).float()
        elif cfg_kwargs is not None:
            out = _unwrap_prediction(model_fn(torch.cat([x_in, x_in]), t.expand(2 * batch), **cfg_kwargs))
            pred_uncond, pred_cond = out.float().chunk(2)
            pred = pred_uncond + guidance_scale * (pred_cond - pred_uncond)
        else:
            pred_cond = _unwrap_prediction(model_fn(x_in, t.expand(batch), **cond)).float()
            pred_uncond = _unwrap_prediction(model_fn(x_in, t.expand(batch), **uncond)).float()
            pred = pred_uncond + guidance_scale * (pred_cond - pred_uncond)

        # The prediction is float32, so the Euler scheduler's cast-back keeps the state in float32.
        latents = scheduler.step(pred, t, latents, return_dict=False)[0]
        if callback is not None:
            replaced = callback(i, t, latents)
            if replaced is not None:
                latents = replaced.to(device=device, dtype=torch.float32)
    return latents

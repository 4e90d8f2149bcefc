"""A plain diffusers ``WanPipeline`` around a (T3-transformed) Wan DiT, for anyone who wants the diffusers API.

t3's own generation loop is `t3.generate`; this pipeline runs diffusers' loop with T3 attention inside the
transformer.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

import t3
from t3.attention import Schedule
from t3.diffusion import build_scheduler
from t3.models import TextEncoder, load_text_encoder
from t3.transform import schedule_of

__all__ = ["make_wan_pipeline"]

logger = logging.getLogger(__name__)


def _tokenizer_and_encoder(text_encoder: Any) -> tuple[Any, torch.nn.Module]:
    if isinstance(text_encoder, str | os.PathLike):
        text_encoder = load_text_encoder(text_encoder)
    if isinstance(text_encoder, TextEncoder):
        return text_encoder.tokenizer, text_encoder.model
    if isinstance(text_encoder, tuple | list) and len(text_encoder) == 2:
        first, second = text_encoder
        return (second, first) if isinstance(first, torch.nn.Module) else (first, second)
    raise TypeError(
        "text_encoder must be a path, a t3.models.TextEncoder or a (tokenizer, UMT5EncoderModel) pair, "
        f"got {type(text_encoder).__name__}"
    )


def make_wan_pipeline(
    dit: torch.nn.Module,
    vae: torch.nn.Module,
    text_encoder_path_or_objects: str | os.PathLike | TextEncoder | tuple[Any, Any],
    scheduler: str | SchedulerMixin = "unipc",
    *,
    schedule: Schedule | str | None = None,
    backend: str = "auto",
    tokens_per_call: int | None = None,
    flow_shift: float = 5.0,
    expand_timesteps: bool = False,
    allow_schedule_change: bool = False,
):
    """Assemble a diffusers ``WanPipeline`` from local components around a T3 DiT.

    The pipeline is plain diffusers: ``pipe(prompt=..., negative_prompt=WAN_NEGATIVE_PROMPT, ...)`` works as
    documented there, with T3 attention inside the transformer.

    Args:
        dit: A ``WanTransformer3DModel``, already transformed with `t3.transform` or transformed here.
        vae: The ``AutoencoderKLWan``.
        text_encoder_path_or_objects: A folder for `t3.models.load_text_encoder`, a `TextEncoder`, or a
            ``(tokenizer, UMT5EncoderModel)`` pair.
        scheduler: ``"unipc"``, ``"diffsynth_euler"``, ``"euler"`` or a diffusers scheduler instance.
        schedule: If given, ``t3.transform(dit, schedule, backend)`` is applied first.
        backend: T3 attention backend when ``schedule`` is given.
        tokens_per_call: bound on the gathered slots per T3 attention call when ``schedule`` is given.
        flow_shift: Timestep shift for a scheduler built from a name.
        expand_timesteps: The pipeline's per-token timestep mode (True in the Wan2.2-TI2V-5B release).
        allow_schedule_change: Use ``schedule`` even where the DiT's T3 record names another one.

    Returns:
        A ``diffusers.WanPipeline``.
    """
    from diffusers import WanPipeline

    if schedule is not None:
        t3.transform(
            dit,
            schedule,
            backend=backend,
            tokens_per_call=tokens_per_call,
            allow_schedule_change=allow_schedule_change,
        )
    elif schedule_of(dit) is None:
        logger.info(
            "make_wan_pipeline: the DiT is not transformed; the pipeline runs dense diffusers attention"
        )
    tokenizer, encoder = _tokenizer_and_encoder(text_encoder_path_or_objects)
    if isinstance(scheduler, str):
        scheduler = build_scheduler(scheduler, flow_shift=flow_shift)
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=encoder,
        vae=vae,
        scheduler=scheduler,
        transformer=dit,
        expand_timesteps=expand_timesteps,
    )

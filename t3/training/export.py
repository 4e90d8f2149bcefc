"""Write the fine-tuned DiT as a plain checkpoint: diffusers folder and original Wan format.

T3 adds no parameters, so the trained state dict already has the stock ``WanTransformer3DModel`` names;
the export takes it whole (gathered by `t3.training.strategies.gather_state_dict`), folds LoRA adapters
into the base weights, builds an untransformed model from it and saves with `t3.models.save_dit`, with
the run's T3 record (schedule, size, step, config digest; `t3.models.record`) in its config. The result loads with
``t3.models.load_dit`` (transformed with the recorded schedule) or plain diffusers, and is what stage 2
starts from (``model.init_from``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from t3.training.finetune import merge_lora_state_dict

__all__ = ["export_dit"]

logger = logging.getLogger(__name__)


def export_dit(
    state_dict: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    out_dir: str | Path,
    *,
    formats: Sequence[str] = ("diffusers", "wan"),
    lora_scaling: float | None = None,
    dtype: str | None = None,
    preset: str | None = None,
    record: Any = None,
) -> dict[str, Path]:
    """Save a gathered DiT state dict in each format under ``out_dir/<format>``.

    Args:
        state_dict: Whole state dict (may contain peft LoRA entries).
        config: The DiT's diffusers config (``dit.config``).
        out_dir: Export folder.
        formats: ``diffusers`` and/or ``wan``.
        lora_scaling: ``alpha / rank`` when the state dict holds LoRA adapters (they are merged).
        dtype: ``bf16``/``fp32`` cast of floating weights, keeping diffusers' ``_keep_in_fp32_modules`` (norms,
            time embedder, modulation table) in float32 as loading does; None keeps them as trained.
        preset: Preset name recorded in the Wan config.
        record: The `t3.models.record.T3Record` written into every format's config (schedule, size,
            step, config digest); None keeps the one in ``config``, if any.

    Returns:
        ``{format: path}``.
    """
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel

    from t3.models import save_dit
    from t3.models.build import as_dtype, cast_state_dict

    state = dict(state_dict)
    if any(".lora_A." in k for k in state):
        if lora_scaling is None:
            raise ValueError("the state dict holds LoRA adapters: pass lora_scaling=alpha/rank to merge them")
        state = merge_lora_state_dict(state, lora_scaling)
    if dtype is not None:
        state = cast_state_dict(state, as_dtype(dtype), WanTransformer3DModel._keep_in_fp32_modules)
    with init_empty_weights():
        model = WanTransformer3DModel.from_config(dict(config))
    # The T3 processors were never part of the state; this model is the stock, untransformed DiT.
    model.load_state_dict(state, strict=True, assign=True)
    out_dir = Path(out_dir)
    written = {}
    for fmt in formats:
        written[fmt] = save_dit(
            model, out_dir / fmt, format=fmt, preset=preset, overwrite=True, record=record
        )
    logger.info("exported the DiT to %s", ", ".join(str(p) for p in written.values()))
    return written

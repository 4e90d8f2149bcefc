"""Write the fine-tuned DiT as a plain checkpoint: diffusers folder and original Wan format.

T3 adds no parameters, so the trained state dict already has the stock ``WanTransformer3DModel`` names;
the export gathers it whole (collective under ZeRO-3 and FSDP2), folds LoRA adapters into the base
weights, builds an untransformed model from it and saves with `t3.models.save_dit`, with the run's T3
record (schedule, size, step, config digest; `t3.models.record`) in its config. The result loads with
``t3.models.load_dit`` (transformed with the recorded schedule) or plain diffusers, and is what stage 2
starts from (``model.init_from``).

Under DeepSpeed the trainable weights are read from the optimizer's fp32 master copies
(``deepspeed.utils.safe_get_full_fp32_param``), not from the bf16 module, so no precision is lost.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from t3.training.finetune import merge_lora_state_dict

__all__ = ["export_dit", "gather_state_dict"]

logger = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def gather_state_dict(trainer: L.Trainer, dit: nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole state dict of ``dit`` on CPU on global rank 0 (None on other ranks).

    Collective: every rank must call it.
    """
    from lightning.pytorch.strategies import DeepSpeedStrategy, ModelParallelStrategy

    strategy = trainer.strategy
    if isinstance(strategy, ModelParallelStrategy):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(dit, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if trainer.is_global_zero else None
    if isinstance(strategy, DeepSpeedStrategy):
        return _gather_deepspeed(trainer, dit)
    if not trainer.is_global_zero:
        return None
    return {k: v.detach().to("cpu", copy=True) for k, v in dit.state_dict().items()}


def _gather_deepspeed(trainer: L.Trainer, dit: nn.Module) -> dict[str, torch.Tensor] | None:
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    out: dict[str, torch.Tensor] = {}
    params = dict(dit.named_parameters())
    for name, param in params.items():
        full = safe_get_full_fp32_param(param) if param.requires_grad else None
        if full is None:  # frozen (no master copy) or no ZeRO optimizer mapping: the module's own value
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                full = param.detach()
                if trainer.is_global_zero:
                    full = full.to("cpu", copy=True)
        if trainer.is_global_zero:
            out[name] = full.detach().to("cpu", copy=True)
    if not trainer.is_global_zero:
        return None
    for name, value in dit.state_dict().items():  # persistent buffers, if any
        out.setdefault(name, value.detach().to("cpu", copy=True))
    return out


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
        dtype: ``bf16``/``fp32`` cast of floating weights; None keeps them as trained.
        preset: Preset name recorded in the Wan config.
        record: The `t3.models.record.T3Record` written into every format's config (schedule, size,
            step, config digest); None keeps the one in ``config``, if any.

    Returns:
        ``{format: path}``.
    """
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel

    from t3.models import save_dit

    state = dict(state_dict)
    if any(".lora_A." in k for k in state):
        if lora_scaling is None:
            raise ValueError("the state dict holds LoRA adapters: pass lora_scaling=alpha/rank to merge them")
        state = merge_lora_state_dict(state, lora_scaling)
    if dtype is not None:
        target = _DTYPES[dtype]
        state = {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}
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

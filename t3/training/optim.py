"""AdamW and its learning-rate schedule: linear warm-up, then constant (the paper) or cosine.

The schedule is a pure function of the optimizer step (`lr_factor`), stepped once per optimizer step by
Lightning, so a resumed run continues on exactly the same curve.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from t3.config import OptimConfig

__all__ = ["build_lr_scheduler", "build_optimizer", "lr_factor"]


def lr_factor(step: int, *, warmup_steps: int, schedule: str, decay_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based).

    Args:
        step: Optimizer steps taken so far.
        warmup_steps: Linear warm-up from ``1 / warmup_steps`` to 1 over this many steps.
        schedule: ``constant`` or ``cosine``.
        decay_steps: Total steps of the run; the cosine reaches ``min_lr_ratio`` there.
        min_lr_ratio: Cosine floor.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"unknown lr schedule {schedule!r}; expected 'constant' or 'cosine'")
    span = max(decay_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(
    params: Iterable[torch.nn.Parameter], cfg: OptimConfig, *, cpu_offload: bool = False
) -> torch.optim.Optimizer:
    """AdamW over ``params``.

    Args:
        params: The trainable parameters.
        cfg: Learning rate, betas, epsilon and weight decay.
        cpu_offload: DeepSpeed keeps the optimizer on the CPU; there it needs its own vectorised
            ``DeepSpeedCPUAdam`` (AdamW mode), which DeepSpeed refuses to replace with a torch optimizer.
    """
    params = [p for p in params if p.requires_grad]
    kwargs = {"lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.eps, "weight_decay": cfg.weight_decay}
    if cpu_offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, adamw_mode=True, **kwargs)
    # foreach: one fused kernel launch per parameter group instead of one per tensor.
    return torch.optim.AdamW(params, foreach=True, **kwargs)


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step ``LambdaLR`` following `lr_factor` (cosine length ``cfg.decay_steps or max_steps``)."""
    decay_steps = cfg.decay_steps or max_steps

    def factor(step: int) -> float:
        return lr_factor(
            step,
            warmup_steps=cfg.warmup_steps,
            schedule=cfg.schedule,
            decay_steps=decay_steps,
            min_lr_ratio=cfg.min_lr_ratio,
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

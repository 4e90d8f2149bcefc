"""The DiT a run fine-tunes: built from the ``model`` config, T3-transformed, its trainable weights selected.

`prepare_for_finetuning` is what training (`t3.training.module`) and the dry run (`t3.training.dry_run`)
both do to the DiT that `build_dit` returns: apply the run's T3 schedule and select the trainable weights
(``finetune.trainable``: all of them, the paper; self-attention only; or LoRA adapters with the
``finetune.lora`` settings). `select_trainable` sets ``requires_grad`` in place and, for ``lora``, injects
peft adapters first. T3 adds no parameters, so the same names apply before and after `t3.transform`.
`merge_lora_state_dict` folds LoRA adapters back into their base weights under the plain
``WanTransformer3DModel`` names, with `lora_scaling`, so an adapted model exports exactly like a fully
fine-tuned one.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

import t3
from t3.config import FinetuneConfig, ModelConfig

__all__ = [
    "SELF_ATTENTION_PROJECTIONS",
    "TrainableSummary",
    "build_dit",
    "inject_lora",
    "lora_scaling",
    "merge_lora_state_dict",
    "prepare_for_finetuning",
    "select_trainable",
]

logger = logging.getLogger(__name__)

#: Self-attention projections of a Wan block (``blocks.{i}.attn1``): what ``trainable=attention`` trains.
SELF_ATTENTION_PROJECTIONS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0")


@dataclass(frozen=True)
class TrainableSummary:
    """Parameter counts after `select_trainable`."""

    mode: str
    trainable: int
    total: int

    def __str__(self) -> str:
        share = 100.0 * self.trainable / max(self.total, 1)
        return f"trainable={self.mode}: {self.trainable:,} of {self.total:,} parameters ({share:.2f}%)"


def build_dit(cfg: ModelConfig, *, device: torch.device | str | None = None) -> nn.Module:
    """The DiT of a ``model`` config: ``init_from``, else ``dit_path``, else random (``random_init``).

    Args:
        cfg: The model config.
        device: ``"meta"`` builds the architecture without memory (dry run, config tests).
    """
    from t3.models import load_dit
    from t3.models.build import dit_from_preset

    if device is not None and torch.device(device).type == "meta":
        return dit_from_preset(cfg.preset, device="meta")
    # Plain weights: `prepare_for_finetuning` transforms them with the run's schedule.
    if cfg.init_from is not None:
        logger.info("loading the DiT from %s (init_from)", cfg.init_from)
        return load_dit(cfg.init_from, preset=cfg.preset, transform=False)
    if cfg.dit_path is not None:
        return load_dit(cfg.dit_path, preset=cfg.preset, transform=False)
    if not cfg.random_init:
        raise ValueError("model.dit_path, model.init_from or model.random_init=true is required")
    logger.warning("model.random_init: training a randomly initialised %s DiT", cfg.preset)
    return dit_from_preset(cfg.preset, seed=cfg.seed)


def prepare_for_finetuning(
    dit: nn.Module, schedule: t3.Schedule, model: ModelConfig, finetune: FinetuneConfig
) -> TrainableSummary:
    """Swap T3 attention with ``schedule`` into ``dit`` and select what ``finetune`` trains (in place).

    The one place that turns the ``model`` and ``finetune`` settings into the swap (attention backend,
    slots per call) and the trainable weights (LoRA settings included), for training and the dry run alike.

    Args:
        dit: The DiT from `build_dit` (real or on the meta device).
        schedule: The run's T3 schedule.
        model: The ``model`` config (``attention_backend``, ``attention_tokens_per_call``).
        finetune: The ``finetune`` config (``trainable``, ``lora``).

    Returns:
        The parameter counts.
    """
    t3.transform(
        dit,
        schedule,
        backend=model.attention_backend,
        tokens_per_call=model.attention_tokens_per_call,
        # Fine-tuning for a schedule is the point: weights recorded with another one are only logged.
        allow_schedule_change=True,
    )
    lora = asdict(finetune.lora)
    lora["target_modules"] = list(lora["target_modules"])
    return select_trainable(dit, finetune.trainable, lora=lora)


def lora_scaling(finetune: FinetuneConfig) -> float | None:
    """``alpha / rank`` of the run's LoRA adapters (what `merge_lora_state_dict` scales by); None without."""
    return finetune.lora.alpha / finetune.lora.rank if finetune.trainable == "lora" else None


def inject_lora(
    model: nn.Module, *, rank: int, alpha: float, dropout: float, target_modules: Sequence[str]
) -> nn.Module:
    """Add peft LoRA adapters (adapter name ``default``) to every linear whose name ends in a target.

    Args:
        model: The DiT (transformed or not).
        rank: Adapter rank ``r``.
        alpha: LoRA alpha (the update is scaled by ``alpha / r``).
        dropout: Dropout on the adapter input.
        target_modules: Module-name suffixes, e.g. ``["to_q", "to_k", "to_v", "to_out.0"]``.

    Returns:
        The same model, with ``lora_A`` / ``lora_B`` parameters added (``lora_B`` is zero, so the output is
        unchanged until training moves it).
    """
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules), bias="none"
    )
    return inject_adapter_in_model(config, model)


def select_trainable(
    model: nn.Module,
    mode: str,
    *,
    lora: Mapping[str, object] | None = None,
) -> TrainableSummary:
    """Freeze everything except what ``mode`` trains (in place).

    Args:
        model: A diffusers ``WanTransformer3DModel``.
        mode: ``all``, ``attention`` (self-attention q/k/v/o weights and biases) or ``lora``.
        lora: For ``lora``: ``rank``, ``alpha``, ``dropout``, ``target_modules`` (see `inject_lora`).

    Returns:
        The parameter counts.

    Raises:
        ValueError: For an unknown mode, or a mode that selects no parameter.
    """
    if mode == "all":
        model.requires_grad_(True)
    elif mode == "attention":
        model.requires_grad_(False)
        for name, module in model.named_modules():
            if name.endswith(SELF_ATTENTION_PROJECTIONS):
                module.requires_grad_(True)
    elif mode == "lora":
        if lora is None:
            raise ValueError("select_trainable(mode='lora') needs the lora settings")
        inject_lora(model, **lora)  # type: ignore[arg-type]
        for name, param in model.named_parameters():
            param.requires_grad_("lora_" in name)
    else:
        raise ValueError(f"unknown trainable mode {mode!r}; expected 'all', 'attention' or 'lora'")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    if trainable == 0:
        raise ValueError(f"trainable={mode} selects no parameter of {type(model).__name__}")
    summary = TrainableSummary(mode, trainable, total)
    logger.info("%s", summary)
    return summary


@torch.no_grad()
def merge_lora_state_dict(state_dict: Mapping[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """Fold peft LoRA entries of a full state dict into their base weights, under the plain names.

    peft stores an adapted linear ``<name>`` as ``<name>.base_layer.weight`` (and ``.bias``) plus
    ``<name>.lora_A.default.weight`` ``[r, in]`` and ``<name>.lora_B.default.weight`` ``[out, r]``; the
    merged weight is ``W + scaling * B @ A`` (``scaling = alpha / r``), computed in float32 and stored in
    ``W``'s dtype. Works on a gathered state dict, so it is the same for every strategy; a state dict
    without LoRA entries is returned as is.

    Args:
        state_dict: A full (unsharded) state dict.
        scaling: ``alpha / rank`` of the adapter.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        out[key.replace(".base_layer.", ".")] = value
    for key, a in state_dict.items():
        if ".lora_A." not in key:
            continue
        name, adapter = key.split(".lora_A.")
        b = state_dict[f"{name}.lora_B.{adapter}"]
        weight = out[f"{name}.weight"]
        out[f"{name}.weight"] = (weight.float() + scaling * (b.float() @ a.float())).to(weight.dtype)
    return out

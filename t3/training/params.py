"""Which DiT weights are trained: all of them (the paper), self-attention only, or LoRA adapters.

`select_trainable` sets ``requires_grad`` in place and, for ``lora``, injects peft adapters first. T3 adds
no parameters, so the same names apply before and after `t3.transform`. `merge_lora_state_dict` folds
LoRA adapters back into their base weights under the plain ``WanTransformer3DModel`` names, so an adapted
model exports exactly like a fully fine-tuned one.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "SELF_ATTENTION_PROJECTIONS",
    "TrainableSummary",
    "has_lora",
    "inject_lora",
    "merge_lora_state_dict",
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


def has_lora(model: nn.Module) -> bool:
    """True if peft LoRA layers were injected into ``model``."""
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) for m in model.modules())


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

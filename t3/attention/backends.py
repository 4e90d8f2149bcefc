"""Attention kernels that run all groups of a T3 layer in one call.

Each kernel takes the full-sequence tensors ``[B, L, N, D]`` and a `GroupIndex`, and returns the
per-branch outputs gathered back to token order, averaged over branches: ``[B, L, N, D]``.

- ``sdpa``: PyTorch ``scaled_dot_product_attention`` on ``[B * nb * G, N, S, D]`` (CPU and GPU).
  Padded slots are excluded with a boolean key mask.
- ``flash``: flash-attn 2 on CUDA (fp16/bf16). Without padding it runs ``flash_attn_func`` on equal
  groups; with padding it runs ``flash_attn_varlen_func`` on the real tokens only, so padded slots
  cost nothing.

`choose_backend` picks the fastest one that can run the given tensors.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

from t3.attention.index import GroupIndex

logger = logging.getLogger(__name__)

Backend = Literal["auto", "sdpa", "flash"]
BACKENDS: tuple[str, ...] = ("auto", "sdpa", "flash")


@functools.cache
def _flash_functions() -> tuple[Callable, Callable] | None:
    """flash-attn 2's ``(flash_attn_func, flash_attn_varlen_func)``, or None where it does not import."""
    try:
        from flash_attn import flash_attn_func, flash_attn_varlen_func
    except (ImportError, OSError, RuntimeError) as err:  # a broken build raises OSError/RuntimeError
        logger.debug("flash-attn unavailable: %s", err)
        return None
    return flash_attn_func, flash_attn_varlen_func


def flash_available() -> bool:
    return _flash_functions() is not None


def can_run_flash(q: torch.Tensor) -> tuple[bool, str]:
    """Whether the flash backend can run on ``q``, and why not."""
    if not flash_available():
        return False, "flash-attn is not installed (pip install -e '.[gpu]' on a CUDA machine)"
    if not q.is_cuda:
        return False, "flash-attn needs CUDA tensors"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return False, f"flash-attn needs float16 or bfloat16, got {q.dtype}"
    if q.shape[-1] > 256 or q.shape[-1] % 8:
        return False, f"flash-attn needs head_dim <= 256 and a multiple of 8, got {q.shape[-1]}"
    return True, ""


def choose_backend(backend: str, q: torch.Tensor) -> str:
    """Resolve ``auto`` to a concrete backend and check that an explicit one can run."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "sdpa":
        return "sdpa"
    ok, why = can_run_flash(q)
    if backend == "flash":
        if not ok:
            raise RuntimeError(f"attention backend 'flash' cannot run: {why}")
        return "flash"
    if not ok:
        logger.debug("backend auto: sdpa (%s)", why)
    return "flash" if ok else "sdpa"


def _mean_over_branches(out: torch.Tensor, scatter: torch.Tensor) -> torch.Tensor:
    """Read every branch's output back in token order and average: ``[B, X, N, D] -> [B, L, N, D]``."""
    result = out.index_select(1, scatter[0])
    for b in range(1, scatter.shape[0]):
        result = result.add_(out.index_select(1, scatter[b]))
    if scatter.shape[0] > 1:
        result = result.mul_(1.0 / scatter.shape[0])
    return result


def _stack_groups(x: torch.Tensor, index: GroupIndex) -> torch.Tensor:
    """``[B, L, N, D] -> [B, nb*G*S, N, D]``: a view when the groups are already contiguous."""
    return x if index.gather is None else x.index_select(1, index.gather)


def sdpa_grouped(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: GroupIndex, scale: float | None = None
) -> torch.Tensor:
    """All groups of all branches through one ``F.scaled_dot_product_attention`` call."""
    B, L, N, D = q.shape
    groups = index.num_branches * index.num_groups
    S = index.group_size

    def grouped(x: torch.Tensor) -> torch.Tensor:
        return _stack_groups(x, index).reshape(B * groups, S, N, D).transpose(1, 2)  # [B*nbG, N, S, D]

    mask = None
    if index.key_valid is not None:
        mask = (
            index.key_valid.view(1, groups, 1, 1, S).expand(B, groups, 1, 1, S).reshape(B * groups, 1, 1, S)
        )
    out = F.scaled_dot_product_attention(grouped(q), grouped(k), grouped(v), attn_mask=mask, scale=scale)
    out = out.transpose(1, 2).reshape(B, groups * S, N, D)
    if index.gather is None:
        return out
    return _mean_over_branches(out, index.scatter)


@functools.lru_cache(maxsize=64)
def _batched_cu_seqlens(cu: torch.Tensor, batch: int, tokens_per_sample: int) -> torch.Tensor:
    offsets = torch.arange(batch, device=cu.device, dtype=cu.dtype).unsqueeze(1) * tokens_per_sample
    starts = (cu[:-1].unsqueeze(0) + offsets).flatten()
    end = torch.tensor([batch * tokens_per_sample], device=cu.device, dtype=cu.dtype)
    return torch.cat([starts, end])


def flash_grouped(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: GroupIndex, scale: float | None = None
) -> torch.Tensor:
    """All groups of all branches through one flash-attn call (varlen when there is padding)."""
    functions = _flash_functions()
    if functions is None:
        raise RuntimeError("attention backend 'flash' cannot run: flash-attn is not installed")
    flash_attn_func, flash_attn_varlen_func = functions
    B, L, N, D = q.shape
    groups = index.num_branches * index.num_groups
    S = index.group_size

    if index.key_valid is None:
        # flash-attn's layout is ours: [batch, seqlen, heads, head_dim], no transpose needed.
        def grouped(x: torch.Tensor) -> torch.Tensor:
            return _stack_groups(x, index).reshape(B * groups, S, N, D)

        out = flash_attn_func(grouped(q), grouped(k), grouped(v), softmax_scale=scale)
        out = out.reshape(B, groups * S, N, D)
        return out if index.gather is None else _mean_over_branches(out, index.scatter)

    # Padding: pack only real tokens, one variable-length sequence per non-empty group and sample.
    packed = index.num_branches * L

    def packed_tokens(x: torch.Tensor) -> torch.Tensor:
        return x.index_select(1, index.packed_gather).reshape(B * packed, N, D)

    cu = _batched_cu_seqlens(index.packed_cu_seqlens, B, packed)
    out = flash_attn_varlen_func(
        packed_tokens(q), packed_tokens(k), packed_tokens(v), cu, cu, S, S, softmax_scale=scale
    )
    return _mean_over_branches(out.reshape(B, packed, N, D), index.packed_scatter)


KERNELS: dict[str, Callable[..., torch.Tensor]] = {"sdpa": sdpa_grouped, "flash": flash_grouped}

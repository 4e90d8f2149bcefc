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


def _group_view(x: torch.Tensor, index: GroupIndex, branch: str) -> torch.Tensor:
    """``[B, L, N, D]`` viewed as ``[B, n_t, n_h, n_w, w_t, w_h, w_w, N, D]``: groups, then slots (divisible grids).

    local: token ``t = g_t * w_t + s_t``; dilated: ``t = s_t * n_t + g_t`` (and likewise for h, w).
    """
    B, _, N, D = x.shape
    n_t, n_h, n_w = index.plan.pieces
    w_t, w_h, w_w = index.plan.window(index.grid)
    if branch == "local":
        return x.view(B, n_t, w_t, n_h, w_h, n_w, w_w, N, D).permute(0, 1, 3, 5, 2, 4, 6, 7, 8)
    return x.view(B, w_t, n_t, w_h, n_h, w_w, n_w, N, D).permute(0, 2, 4, 6, 1, 3, 5, 7, 8)


def _stack_groups(x: torch.Tensor, index: GroupIndex) -> torch.Tensor:
    """``[B, L, N, D] -> [B, nb*G*S, N, D]``, branch-major, each group's slots contiguous.

    Without padding this is one strided copy per branch into the stacked output (or a plain view when
    the groups are already contiguous, e.g. whole frames); with padding it gathers through the index map.
    """
    if index.gather is None:
        return x
    if index.key_valid is not None:
        return x.index_select(1, index.gather)
    B, L, N, D = x.shape
    # Copy each branch straight into its slice of one buffer (torch.stack would copy twice).
    stacked = x.new_empty(B, index.num_branches, L, N, D)
    for b, branch in enumerate(index.branches):
        target = stacked[:, b]
        target.view(_group_view(x, index, branch).shape).copy_(_group_view(x, index, branch))
    return stacked.view(B, index.num_branches * L, N, D)


def _mean_over_branches(out: torch.Tensor, index: GroupIndex, packed: bool = False) -> torch.Tensor:
    """Read every branch's output back in token order and average: ``[B, nb*X, N, D] -> [B, L, N, D]``."""
    if index.gather is None:
        return out
    nb = index.num_branches
    if index.key_valid is not None:
        scatter = index.packed_scatter if packed else index.scatter
        result = out.index_select(1, scatter[0])
        for b in range(1, nb):
            result = result.add_(out.index_select(1, scatter[b]))
    else:
        # Divisible grid: the stacked output is [B, nb, L, N, D] in group order. Copy the first branch
        # into token order, then add the others through strided views of the result (no index maps).
        B, _, N, D = out.shape
        L = index.num_tokens
        per_branch = out.view(B, nb, L, N, D)
        result = torch.empty(B, L, N, D, dtype=out.dtype, device=out.device)
        for b, branch in enumerate(index.branches):
            target = _group_view(result, index, branch)  # token-ordered storage, group-ordered indexing
            source = per_branch[:, b].view(target.shape)
            if b == 0:
                target.copy_(source)
            else:
                target.add_(source)
    if nb > 1:
        result = result.mul_(1.0 / nb)
    return result


class _Regroup:
    """A grouped copy that autograd saved for backward, stored as its source and how to rebuild it."""

    def __init__(self, source: torch.Tensor, regroup: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.source = source
        self.regroup = regroup
        self.version = source._version


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))


class regroup_in_backward(torch.autograd.graph.saved_tensors_hooks):  # noqa: N801 (a context manager)
    """Let autograd keep q, k, v once instead of their ``nb``-times larger grouped copies.

    The attention kernel saves its grouped inputs for backward. Inside this context those saved
    tensors are replaced by a reference to the ungrouped source and the grouping function, and are
    rebuilt (one copy each, bit-identical) when backward needs them. Saves ``(2 nb - 1)/(2 nb)`` of
    the attention inputs' activation memory per layer; costs one extra gather per tensor in backward.
    """

    def __init__(
        self, pairs: list[tuple[torch.Tensor, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]]
    ) -> None:
        recipes = {_storage_key(grouped): (source, regroup) for grouped, source, regroup in pairs}

        def pack(t: torch.Tensor) -> torch.Tensor | _Regroup:
            recipe = recipes.get(_storage_key(t))
            return t if recipe is None else _Regroup(*recipe)

        def unpack(saved: torch.Tensor | _Regroup) -> torch.Tensor:
            if not isinstance(saved, _Regroup):
                return saved
            if saved.source._version != saved.version:
                raise RuntimeError("t3_attention: q, k or v was modified in place after the forward pass")
            with torch.no_grad():
                return saved.regroup(saved.source)

        super().__init__(pack, unpack)


def _saves_grouped_copies(index: GroupIndex, *tensors: torch.Tensor) -> bool:
    """Whether to store sources instead of grouped copies for backward.

    Only when autograd records this call, the grouping is a real copy, and no other saved-tensor
    policy (activation checkpointing, CPU offload) is active: an outer policy already decides what is
    kept, and holding the sources inside a checkpointed block would keep them alive.
    """
    return (
        torch.is_grad_enabled()
        and any(t.requires_grad for t in tensors)
        and index.gather is not None
        and torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    )


def _attend(
    kernel: Callable[..., torch.Tensor],
    grouping: Callable[[torch.Tensor], torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: GroupIndex,
    regroup: bool,
    **kwargs,
) -> torch.Tensor:
    """``kernel(grouping(q), grouping(k), grouping(v), **kwargs)``, regrouping in backward if asked."""
    qg, kg, vg = grouping(q), grouping(k), grouping(v)
    if not (regroup and _saves_grouped_copies(index, q, k, v)):
        return kernel(qg, kg, vg, **kwargs)
    with regroup_in_backward([(qg, q, grouping), (kg, k, grouping), (vg, v, grouping)]):
        return kernel(qg, kg, vg, **kwargs)


def sdpa_grouped(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: GroupIndex,
    scale: float | None = None,
    regroup: bool = True,
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
    out = _attend(
        F.scaled_dot_product_attention, grouped, q, k, v, index, regroup, attn_mask=mask, scale=scale
    )
    out = out.transpose(1, 2).reshape(B, groups * S, N, D)
    return _mean_over_branches(out, index)


@functools.lru_cache(maxsize=64)
def _batched_cu_seqlens(cu: torch.Tensor, batch: int, tokens_per_sample: int) -> torch.Tensor:
    offsets = torch.arange(batch, device=cu.device, dtype=cu.dtype).unsqueeze(1) * tokens_per_sample
    starts = (cu[:-1].unsqueeze(0) + offsets).flatten()
    end = torch.tensor([batch * tokens_per_sample], device=cu.device, dtype=cu.dtype)
    return torch.cat([starts, end])


def flash_grouped(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: GroupIndex,
    scale: float | None = None,
    regroup: bool = True,
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

        out = _attend(flash_attn_func, grouped, q, k, v, index, regroup, softmax_scale=scale)
        return _mean_over_branches(out.reshape(B, groups * S, N, D), index)

    # Padding: pack only real tokens, one variable-length sequence per non-empty group and sample.
    packed = index.num_branches * L

    def packed_tokens(x: torch.Tensor) -> torch.Tensor:
        return x.index_select(1, index.packed_gather).reshape(B * packed, N, D)

    cu = _batched_cu_seqlens(index.packed_cu_seqlens, B, packed)
    out = _attend(
        flash_attn_varlen_func,
        packed_tokens,
        q,
        k,
        v,
        index,
        regroup,
        cu_seqlens_q=cu,
        cu_seqlens_k=cu,
        max_seqlen_q=S,
        max_seqlen_k=S,
        softmax_scale=scale,
    )
    return _mean_over_branches(out.reshape(B, packed, N, D), index, packed=True)


KERNELS: dict[str, Callable[..., torch.Tensor]] = {"sdpa": sdpa_grouped, "flash": flash_grouped}

"""The T3 attention op: multi-scale window attention as one pure function.

Layout legend: ``B`` batch, ``L = T * H * W`` tokens in t, h, w order, ``N`` heads, ``D`` head dim,
``G`` groups per partition, ``S`` slots per group, ``nb`` branches computed.
"""

from __future__ import annotations

import torch

from t3.attention.backends import KERNELS, choose_backend, resolve_tokens_per_call
from t3.attention.index import GroupIndex, group_index
from t3.attention.plan import BRANCHES, Grid, WindowPlan, check_grid, effective_branches


def autocast_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v in the autocast dtype when autocast is on for their device, else as they are.

    Under autocast (bf16-mixed training) attention is a lower-precision op, as SDPA is; the inputs
    may differ in dtype (a DiT's RMSNorm keeps q, k in float32). Cast once, so that the grouped
    copies and the output are in the autocast dtype too.
    """
    if not torch.is_autocast_enabled(q.device.type):
        return q, k, v
    dtype = torch.get_autocast_dtype(q.device.type)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def t3_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: Grid,
    plan: WindowPlan,
    branches: tuple[str, ...] = BRANCHES,
    backend: str = "auto",
    *,
    share_identical: bool = True,
    scale: float | None = None,
    regroup_in_backward: bool = True,
    tokens_per_call: int | None = None,
    layer: int | None = None,
) -> torch.Tensor:
    """Attention inside the local and/or dilated groups of ``plan``, averaged over branches.

    Args:
        q, k, v: ``[B, L, N, D]`` with tokens ordered t, h, w over ``grid``.
        grid: ``(T, H, W)`` token grid with ``T * H * W == L``.
        plan: pieces per axis; any grid works (non-divisible axes are padded and masked).
        branches: ``("local",)``, ``("dilated",)`` or both (the output is their mean).
        backend: ``"sdpa"``, ``"flash"`` (flash-attn on CUDA) or ``"auto"`` (the fastest that runs).
        share_identical: compute one branch when both partitions coincide (same output, half the work).
        scale: softmax scale, default ``1 / sqrt(D)``.
        regroup_in_backward: keep q, k, v for backward instead of their grouped copies (rebuilt when
            needed), unless an outer saved-tensor policy such as activation checkpointing is active.
        tokens_per_call: at most this many gathered slots per attention call (at least one group);
            bounds the transient memory of the grouped copies. None: one call for all groups on GPU
            and whenever autograd records; otherwise, on CPU, runs of about 4096 slots (faster there,
            see ``backends.CPU_TOKENS_PER_CALL``).
        layer: layer index, only used to name the layer in error messages.

    Returns:
        ``[B, L, N, D]`` with ``q``'s dtype, or the autocast dtype under autocast (as
        ``F.scaled_dot_product_attention``).
    """
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k, v must all be [batch, tokens, heads, head_dim] of one shape, got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    grid = check_grid(grid)
    T, H, W = grid
    if T * H * W != q.shape[1]:
        raise ValueError(f"grid {grid} has {T * H * W} tokens but q has {q.shape[1]}")
    plan.check(grid, layer=layer)
    computed = effective_branches(plan, grid, branches, share_identical)
    index = group_index(grid, plan, computed, q.device)
    return grouped_attention(
        q, k, v, index, backend, scale=scale, regroup_in_backward=regroup_in_backward,
        tokens_per_call=tokens_per_call,
    )  # fmt: skip


def grouped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: GroupIndex,
    backend: str = "auto",
    *,
    scale: float | None = None,
    regroup_in_backward: bool = True,
    tokens_per_call: int | None = None,
) -> torch.Tensor:
    """`t3_attention` after its checks: attention inside the groups of a prebuilt `GroupIndex`.

    For callers that build each layer's index once, outside the traced code: `t3.transform` does, so
    that ``torch.compile`` sees fixed index maps instead of tracing their construction. ``q``, ``k``,
    ``v`` must match ``index.grid`` (not checked here); the other arguments are `t3_attention`'s.
    """
    q, k, v = autocast_inputs(q, k, v)
    kernel = KERNELS[choose_backend(backend, q)]
    resolve_tokens_per_call(tokens_per_call, q.device)  # a bad value fails before any work
    return kernel(q, k, v, index, scale, regroup_in_backward, tokens_per_call)

"""T3 attention of one layer when each rank of an SP group holds a shard of the tokens.

Three local steps around two collectives (`t3.parallel.exchange` explains the plan):

    send = pack_rows(q, k, v, plan)              # [n_send, B, 3, D]: this rank's rows, by destination
    recv = exchange_rows(send, ...)              # [n_recv, B, 3, D]: the rows of this rank's units
    partial = attend_rows(recv, plan, ...)       # [n_recv, B, D]: per row, sum of its branch outputs here
    back = exchange_rows(partial, reversed)      # [n_send, B, D]
    out = unpack_rows(back, plan, ...)           # [B, P, N, D]: mean over branches, on the row's holder

The per-rank attention reuses the kernels of `t3.attention.backends` on the received rows, so the
result equals `t3.attention.t3_attention` over the whole sequence (tested on 1 to 8 simulated ranks and
on 2 and 4 gloo processes). With one rank it is `t3_attention` itself.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from t3.attention.backends import KERNELS, choose_backend, resolve_tokens_per_call
from t3.attention.op import autocast_inputs, t3_attention
from t3.attention.plan import BRANCHES, Grid, WindowPlan, check_grid, effective_branches
from t3.parallel.assignment import DEFAULT_MAX_IMBALANCE
from t3.parallel.comm import ProcessGroup, exchange_rows
from t3.parallel.exchange import ExchangePlan, exchange_plan
from t3.parallel.layout import ShardLayout


def pack_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: ExchangePlan) -> torch.Tensor:
    """The rows this rank sends, ``[n_send, B, 3, D]``, from its ``[B, P, N, D]`` shards of q, k, v."""
    B, P, N, D = q.shape
    rows = torch.stack((q, k, v), dim=3).view(B, P * N, 3, D)
    return rows.index_select(1, plan.send_rows).transpose(0, 1).contiguous()


def attend_rows(
    received: torch.Tensor,
    plan: ExchangePlan,
    kernel: Callable[..., torch.Tensor],
    scale: float | None = None,
    tokens_per_call: int | None = None,
) -> torch.Tensor:
    """Attention over this rank's units: ``[n_recv, B, 3, D]`` rows in, ``[n_recv, B, D]`` partial outputs out."""
    if plan.index is None:  # no unit here: nothing received, nothing to return (kept in the graph)
        return received[:, :, 0].contiguous()
    q, k, v = (received[:, :, i].transpose(0, 1).unsqueeze(2) for i in range(3))  # [B, n_recv, 1, D]
    out = kernel(q, k, v, plan.index, scale, True, tokens_per_call)
    return out.squeeze(2).transpose(0, 1).contiguous()


def unpack_rows(partial: torch.Tensor, plan: ExchangePlan, shard_size: int) -> torch.Tensor:
    """``[B, P, N, D]`` output from the partial outputs ``[n_send, B, D]`` returned for this rank's rows."""
    n, B, D = partial.shape
    out = partial.new_zeros(B, shard_size * plan.heads, D)
    out = out.index_add(1, plan.send_rows, partial.transpose(0, 1), alpha=1.0 / plan.num_branches)
    return out.view(B, shard_size, plan.heads, D)


def sequence_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: Grid,
    plan: WindowPlan,
    branches: tuple[str, ...] = BRANCHES,
    backend: str = "auto",
    *,
    layout: ShardLayout,
    group: ProcessGroup | None = None,
    share_identical: bool = True,
    scale: float | None = None,
    tokens_per_call: int | None = None,
    policy: str = "auto",
    max_imbalance: float = DEFAULT_MAX_IMBALANCE,
    layer: int | None = None,
) -> torch.Tensor:
    """`t3_attention` for q, k, v sharded over the ranks of ``group`` as ``layout`` says.

    Args:
        q, k, v: ``[B, P, N, D]``, this rank's tokens (``P = layout.shard_size``; rows past its real
            tokens are padding and ignored).
        grid, plan, branches, backend, share_identical, scale, tokens_per_call, layer: as in
            `t3.attention.t3_attention`, for the whole sequence.
        layout: how the tokens of ``grid`` are sharded over the group.
        group: the SP process group (None: the default group); every rank calls this together.
        policy, max_imbalance: how units are assigned to ranks (`t3.parallel.assignment.assign_layer`).

    Returns:
        ``[B, P, N, D]``: this rank's tokens of the layer output (padding rows zero).
    """
    grid = check_grid(grid)
    if grid != layout.grid:
        raise ValueError(f"grid {grid} does not match the shard layout's grid {layout.grid}")
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape or q.shape[1] != layout.shard_size:
        raise ValueError(
            f"q, k, v must all be [batch, {layout.shard_size} local tokens, heads, head_dim], got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if layout.sp == 1:
        return t3_attention(
            q, k, v, grid, plan, branches, backend, share_identical=share_identical, scale=scale,
            tokens_per_call=tokens_per_call, layer=layer,
        )  # fmt: skip
    if dist.get_world_size(group) != layout.sp:
        raise ValueError(
            f"the SP group has {dist.get_world_size(group)} ranks but the layout is for {layout.sp}"
        )
    plan.check(grid, layer=layer)
    q, k, v = autocast_inputs(q, k, v)
    computed = effective_branches(plan, grid, branches, share_identical)
    kernel = KERNELS[choose_backend(backend, q)]
    resolve_tokens_per_call(tokens_per_call, q.device)
    ex = exchange_plan(
        layout, plan, computed, q.shape[2], dist.get_rank(group),
        policy=policy, max_imbalance=max_imbalance, device=q.device,
    )  # fmt: skip

    send = pack_rows(q, k, v, ex)
    received = exchange_rows(send, ex.send_counts, ex.recv_counts, group) if ex.exchanges else send
    partial = attend_rows(received, ex, kernel, scale, tokens_per_call)
    back = exchange_rows(partial, ex.recv_counts, ex.send_counts, group) if ex.exchanges else partial
    return unpack_rows(back, ex, layout.shard_size)

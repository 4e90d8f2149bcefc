"""Autograd-aware collectives over an SP group: row exchange (all-to-all) and gathering token shards.

Both are `torch.autograd.Function`s whose backward is the matching collective, so forward and backward
run under any engine (DDP, DeepSpeed ZeRO, FSDP2) without knowing about them. Every rank of the group
must call them in the same order with the same shapes; the backward collectives then also line up,
because every rank's graph has the same chain of exchanges.

- `exchange_rows`: ``dist.all_to_all_single`` with per-rank split sizes along dim 0 (gloo and NCCL both
  take uneven splits); backward sends the gradients back along the reverse splits.
- `gather_tokens`: every rank's padded shard concatenated, padding dropped. Its backward sums the
  gradients that all ranks computed for each shard (a reduce-scatter, done as an all-to-all so that gloo
  runs it too): with every rank computing the same loss on the gathered output, each shard's gradient
  arrives ``sp`` times. See `t3.parallel.loss` for what that means for the loss scale.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from t3.parallel.layout import ShardLayout

ProcessGroup = dist.ProcessGroup


class _ExchangeRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, send_counts, recv_counts, group):  # type: ignore[override]
        ctx.send_counts, ctx.recv_counts, ctx.group = send_counts, recv_counts, group
        out = x.new_empty((sum(recv_counts), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), list(recv_counts), list(send_counts), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        back = grad.new_empty((sum(ctx.send_counts), *grad.shape[1:]))
        dist.all_to_all_single(
            back, grad.contiguous(), list(ctx.send_counts), list(ctx.recv_counts), group=ctx.group
        )
        return back, None, None, None


def exchange_rows(
    x: torch.Tensor, send_counts: Sequence[int], recv_counts: Sequence[int], group: ProcessGroup | None
) -> torch.Tensor:
    """Send ``x``'s consecutive row blocks (``send_counts[r]`` rows to rank ``r``), receive ``recv_counts``.

    Returns the received rows, grouped by source rank in rank order: ``[sum(recv_counts), *x.shape[1:]]``.
    """
    return _ExchangeRows.apply(x, tuple(send_counts), tuple(recv_counts), group)


class _GatherShards(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):  # type: ignore[override]
        ctx.group = group
        out = x.new_empty((dist.get_world_size(group), *x.shape))
        dist.all_gather(list(out.unbind(0)), x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        # Reduce-scatter: rank r receives every rank's gradient of shard r and sums them.
        received = torch.empty_like(grad)
        dist.all_to_all_single(received, grad.contiguous(), group=ctx.group)
        return received.sum(dim=0), None


def gather_tokens(x: torch.Tensor, layout: ShardLayout, group: ProcessGroup | None) -> torch.Tensor:
    """The full sequence ``[B, L, ...]`` from every rank's padded shard ``[B, shard_size, ...]``."""
    shards = _GatherShards.apply(x.transpose(0, 1), group)  # [sp, P, B, ...]
    rows = shards.flatten(0, 1).index_select(0, layout.padded_positions().to(x.device))
    return rows.transpose(0, 1)

"""Dense masked attention: the oracle that defines what T3 attention computes.

Builds each partition's ``[L, L]`` boolean mask from the definition (`group_ids`) and runs plain
softmax attention over the whole sequence. Quadratic in memory: for tests, docs and small shapes only.
"""

from __future__ import annotations

import torch

from t3.attention.index import group_ids
from t3.attention.plan import BRANCHES, Branch, Grid, WindowPlan, check_branches


def partition_mask(grid: Grid, plan: WindowPlan, branch: Branch) -> torch.Tensor:
    """``[L, L]`` True where query token i and key token j fall in the same group of ``branch``."""
    ids = group_ids(grid, plan, branch)
    return ids.unsqueeze(1) == ids.unsqueeze(0)


def dense_masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float | None = None
) -> torch.Tensor:
    """Softmax attention over ``[B, L, N, D]`` tensors with an optional ``[L, L]`` boolean mask."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("blnd,bmnd->bnlm", q, k) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    return torch.einsum("bnlm,bmnd->blnd", weights, v)


def t3_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: Grid,
    plan: WindowPlan,
    branches: tuple[str, ...] = BRANCHES,
    scale: float | None = None,
) -> torch.Tensor:
    """The mean over ``branches`` of dense attention masked to each partition (never shares branches)."""
    outs = [
        dense_masked_attention(q, k, v, partition_mask(grid, plan, b), scale)
        for b in check_branches(branches)
    ]
    return torch.stack(outs).mean(0)


def straightforward_t3_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: Grid,
    plan: WindowPlan,
    scale: float | None = None,
) -> torch.Tensor:
    """T3 attention written the obvious way: per branch, rearrange and copy q, k, v into windows,
    attend, rearrange back, then average. Divisible grids only.

    The baseline that `benchmarks/attention.py` compares the grouped op against, and a second,
    independent reference in the tests.
    """
    from einops import rearrange

    if plan.needs_padding(grid):
        raise ValueError(f"straightforward_t3_attention needs a divisible grid, got {grid} with plan {plan}")
    w_t, w_h, w_w = plan.window(grid)
    sizes = dict(nt=plan.n_t, nh=plan.n_h, nw=plan.n_w, wt=w_t, wh=w_h, ww=w_w)
    tokens = {
        "local": "b (nt wt nh wh nw ww) n d",
        "dilated": "b (wt nt wh nh ww nw) n d",
    }
    windows = "(b nt nh nw) n (wt wh ww) d"
    outs = []
    for pattern in tokens.values():
        qw, kw, vw = (rearrange(x, f"{pattern} -> {windows}", **sizes).contiguous() for x in (q, k, v))
        o = torch.nn.functional.scaled_dot_product_attention(qw, kw, vw, scale=scale)
        outs.append(rearrange(o, f"{windows} -> {pattern}", **sizes).contiguous())
    return (outs[0] + outs[1]) / 2

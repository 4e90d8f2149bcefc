"""Exchange plans: the index maps and split sizes one rank uses to run its share of a T3 layer.

Rows are ``(token, head)`` pairs, numbered ``token * N + head`` globally and ``local_token * N + head``
on the rank holding the token. Given a layer's `LayerAssignment`, rank ``r``

1. sends each row it holds to every distinct rank computing one of the row's groups (itself included),
   grouped by destination rank, each block in increasing row number;
2. receives the rows of all its units in increasing row number, which is also grouped by source rank
   (token ranges are contiguous and in rank order), so no permutation is needed;
3. attends over the received rows: each unit ``(branch, group, head)`` is a group of ``S`` received rows
   with a single head, described by a `GroupIndex` so that the kernels of `t3.attention.backends` run
   unchanged (padded slots masked as keys and dropped as queries, exactly as on one device);
4. sends each row's partial output (the sum over the branches it computed) back to the row's holder,
   which adds the partial outputs with weight ``1 / nb``: the mean over branches.

Plans are built on the CPU once per (layout, plan, branches, heads, rank, policy) and cached, and
once more per device.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

from t3.attention.index import GroupIndex, group_ids
from t3.attention.plan import Branch, WindowPlan
from t3.parallel.assignment import DEFAULT_MAX_IMBALANCE, assign_layer, group_tokens
from t3.parallel.layout import ShardLayout


@dataclass(frozen=True, eq=False)
class ExchangePlan:
    """What one rank sends, receives and computes in one layer.

    Attributes:
        rank, sp: this rank and the SP group size.
        heads: attention heads ``N``.
        num_branches: ``nb``, branches computed (partial outputs are added with weight ``1 / nb``).
        send_rows: ``[n_send]`` local row numbers to send, grouped by destination rank.
        send_counts: rows sent to each rank (itself included).
        recv_counts: rows received from each rank (itself included).
        index: groups of received rows for the attention kernels, or None when this rank has no unit.
        exchanges: whether any rank of the group sends a row to another rank; when not, every rank's
            received rows are exactly the rows it sends itself, and the collectives are skipped.
    """

    rank: int
    sp: int
    heads: int
    num_branches: int
    send_rows: torch.Tensor
    send_counts: tuple[int, ...]
    recv_counts: tuple[int, ...]
    index: GroupIndex | None
    exchanges: bool

    def to(self, device: torch.device) -> ExchangePlan:
        return dataclasses.replace(
            self,
            send_rows=self.send_rows.to(device, non_blocking=True),
            index=None if self.index is None else self.index.to(device),
        )


def _send_side(layout: ShardLayout, plan: WindowPlan, branches: tuple[Branch, ...], rank_of: torch.Tensor, rank: int):
    start, stop = layout.range_of(rank)
    heads = rank_of.shape[-1]
    rows = (torch.arange(stop - start).unsqueeze(1) * heads + torch.arange(heads)).flatten()
    dests, sends = [], []
    for b, branch in enumerate(branches):
        dest = rank_of[b][group_ids(layout.grid, plan, branch)[start:stop]].flatten()  # [n * N]
        new = torch.ones_like(dest, dtype=torch.bool)  # a rank an earlier branch sends to gets the row once
        for earlier in dests:
            new &= dest != earlier
        dests.append(dest)
        sends.append((dest[new], rows[new]))
    dest = torch.cat([d for d, _ in sends])
    row = torch.cat([r for _, r in sends])
    order = torch.argsort(dest * rows.numel() + row)
    return row[order], tuple(torch.bincount(dest, minlength=layout.sp).tolist())


def _receive_side(layout: ShardLayout, plan: WindowPlan, branches: tuple[Branch, ...], rank_of: torch.Tensor, rank: int):
    heads = rank_of.shape[-1]
    b, g, h = torch.nonzero(rank_of == rank, as_tuple=True)
    if b.numel() == 0:
        return (0,) * layout.sp, None
    slots, valid = [], []
    for i, branch in enumerate(branches):
        tokens, real = group_tokens(layout.grid, plan, branch)
        mine = b == i
        slots.append(tokens[g[mine]] * heads + h[mine].unsqueeze(1))  # [units, S] global row numbers
        valid.append(real[g[mine]])
    slots, valid = torch.cat(slots), torch.cat(valid)
    needed = torch.unique(slots[valid])  # sorted: the order the rows arrive in
    recv_counts = tuple(torch.bincount(layout.owner(needed // heads), minlength=layout.sp).tolist())

    position = torch.searchsorted(needed, slots)
    units, size = slots.shape
    # Padded slots read the unit's first real row (masked as keys, never read back as queries).
    first_real = position.gather(1, valid.to(torch.int8).argmax(dim=1, keepdim=True))
    position = torch.where(valid, position, first_real)
    padded = not bool(valid.all())
    lengths = valid.sum(dim=1)
    cu = torch.zeros(units + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0)
    index = GroupIndex(
        grid=layout.grid,
        plan=plan,
        branches=branches,
        # One "branch" of `units` groups: the kernel sums this rank's outputs per row; the holder
        # of the row applies the 1 / nb of the branch mean.
        num_branches=1,
        num_groups=units,
        group_size=size,
        gather=position.flatten(),
        key_valid=valid if padded else None,
        slot_valid=valid if padded else None,
        packed_gather=position[valid],
        packed_cu_seqlens=cu,
        packed_offsets=tuple(cu.tolist()),
    )
    return recv_counts, index


@functools.lru_cache(maxsize=256)
def _exchange_plan_cpu(
    layout: ShardLayout,
    plan: WindowPlan,
    branches: tuple[Branch, ...],
    heads: int,
    rank: int,
    policy: str,
    max_imbalance: float,
) -> ExchangePlan:
    assignment = assign_layer(layout, plan, branches, heads, policy, max_imbalance)
    send_rows, send_counts = _send_side(layout, plan, assignment.branches, assignment.rank_of, rank)
    recv_counts, index = _receive_side(layout, plan, assignment.branches, assignment.rank_of, rank)
    return ExchangePlan(
        rank=rank,
        sp=layout.sp,
        heads=heads,
        num_branches=len(assignment.branches),
        send_rows=send_rows,
        send_counts=send_counts,
        recv_counts=recv_counts,
        index=index,
        exchanges=assignment.exchanges,
    )


@functools.lru_cache(maxsize=256)
def _exchange_plan_on(
    layout: ShardLayout,
    plan: WindowPlan,
    branches: tuple[Branch, ...],
    heads: int,
    rank: int,
    policy: str,
    max_imbalance: float,
    device: torch.device,
) -> ExchangePlan:
    return _exchange_plan_cpu(layout, plan, branches, heads, rank, policy, max_imbalance).to(device)


def exchange_plan(
    layout: ShardLayout,
    plan: WindowPlan,
    branches: tuple[Branch, ...],
    heads: int,
    rank: int,
    *,
    policy: str = "auto",
    max_imbalance: float = DEFAULT_MAX_IMBALANCE,
    device: torch.device | str = "cpu",
) -> ExchangePlan:
    """Cached `ExchangePlan` of ``rank`` for one layer (``branches`` as computed), on ``device``."""
    if not 0 <= rank < layout.sp:
        raise ValueError(f"rank must be in [0, {layout.sp}), got {rank}")
    return _exchange_plan_on(
        layout, plan, tuple(branches), heads, rank, policy, float(max_imbalance), torch.device(device)
    )

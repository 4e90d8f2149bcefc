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


def _send_side(
    layout: ShardLayout, plan: WindowPlan, branches: tuple[Branch, ...], rank_of: torch.Tensor, rank: int
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``(send_rows, send_counts)``: this rank's local rows by destination, increasing within each."""
    start, stop = layout.range_of(rank)
    # dest[b][i]: rank computing branch b of local row i (rows numbered local_token * N + head).
    dest = [
        rank_of[b][group_ids(layout.grid, plan, branch)[start:stop]].flatten()
        for b, branch in enumerate(branches)
    ]
    blocks = []
    for r in range(layout.sp):  # a linear pass per destination keeps every block in row order
        goes = torch.zeros_like(dest[0], dtype=torch.bool)
        for d in dest:
            goes |= d == r
        blocks.append(torch.nonzero(goes).flatten())
    return torch.cat(blocks), tuple(len(block) for block in blocks)


def _receive_side(
    layout: ShardLayout, plan: WindowPlan, branches: tuple[Branch, ...], rank_of: torch.Tensor, rank: int
) -> tuple[tuple[int, ...], GroupIndex | None]:
    """``(recv_counts, index)``: rows received from each rank, and this rank's units over them."""
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
    padded = not bool(valid.all())
    if padded:  # padded slots read the unit's first real row (masked as keys, never read back as queries)
        first_real = slots.gather(1, valid.to(torch.int8).argmax(dim=1, keepdim=True))
        slots = torch.where(valid, slots, first_real)

    # The rows needed arrive in increasing row number; a row's place in that order is the number of
    # needed rows before it (a linear pass over all L * N row numbers, no sort).
    needed = torch.zeros(layout.num_tokens * heads, dtype=torch.bool)
    needed[slots] = True
    place = torch.cumsum(needed, 0) - 1
    rows = torch.nonzero(needed).flatten()
    recv_counts = tuple(torch.bincount(layout.owner(rows // heads), minlength=layout.sp).tolist())
    position = place[slots]
    units, size = slots.shape
    cu = torch.zeros(units + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(valid.sum(dim=1), 0)
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
def _exchange_plan(
    layout: ShardLayout,
    plan: WindowPlan,
    branches: tuple[Branch, ...],
    heads: int,
    rank: int,
    policy: str,
    max_imbalance: float,
    device: torch.device,
) -> ExchangePlan:
    if device.type != "cpu":  # built once on the CPU, then moved
        cpu = _exchange_plan(layout, plan, branches, heads, rank, policy, max_imbalance, torch.device("cpu"))
        return cpu.to(device)
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
    return _exchange_plan(
        layout, plan, tuple(branches), heads, rank, policy, float(max_imbalance), torch.device(device)
    )

"""Gather/scatter index maps that turn a flat token sequence into stacked attention groups.

For a grid, a plan and the branches to compute, `group_index` returns integer maps such that

    x_gathered = x[:, gather]                  # [B, nb*G*S, N, D], groups of S slots, branch-major
    out[:, gather] += out_gathered / nb        # real slots only: each token once per branch

where ``nb`` is the number of branches, ``G`` the groups per partition and ``S`` the slots per group.
Both partitions have the same ``G`` and ``S``, so groups of both branches can go through one
attention call, stacked along the batch axis, and any run of consecutive groups can be gathered on
its own (the kernels attend in bounded runs of groups on CPU). Padded slots (non-divisible axes) point at a real token
of their group and are masked as keys; a group made only of padding is left unmasked so its softmax
stays finite (its outputs are never read back).

Maps are built once per (grid, plan, branches) on the CPU and once more per device, then cached.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

from t3.attention.plan import Branch, Grid, WindowPlan, check_branches, check_grid


@dataclass(frozen=True)
class GroupIndex:
    """Index maps for one (grid, plan, branches).

    Attributes:
        grid, plan, branches: what the maps are for (``branches`` as computed).
        num_branches: ``nb``, branches stacked in the gathered sequence.
        num_groups: ``G``, groups per branch.
        group_size: ``S``, slots per group (padding included).
        gather: ``[nb * G * S]`` token index of every slot, or None when it is the identity
            (one branch, no padding, groups already contiguous in memory: zero-copy views).
        key_valid: ``[nb * G, S]`` True where a slot may be attended to as a key (real tokens, and
            every slot of a group made only of padding), or None without padding.
        slot_valid: ``[nb * G, S]`` True where a slot holds a real token, or None without padding.
        packed_gather: ``[nb * L]`` real tokens only, in group order (for variable-length kernels).
        packed_cu_seqlens: ``[num_nonempty_groups + 1]`` int32 cumulative group lengths in ``packed_gather``.
        packed_offsets: ``packed_cu_seqlens`` as Python ints (chunk boundaries without a device sync).
    """

    grid: Grid
    plan: WindowPlan
    branches: tuple[Branch, ...]
    num_branches: int
    num_groups: int
    group_size: int
    gather: torch.Tensor | None
    key_valid: torch.Tensor | None
    slot_valid: torch.Tensor | None
    packed_gather: torch.Tensor
    packed_cu_seqlens: torch.Tensor
    packed_offsets: tuple[int, ...]

    @property
    def is_identity(self) -> bool:
        return self.gather is None

    def to(self, device: torch.device) -> GroupIndex:
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=True)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **moved)


def _axis_slots(length: int, pieces: int, window: int, branch: Branch) -> torch.Tensor:
    """``[pieces, window]`` coordinate along one axis of every slot, grouped by piece."""
    group = torch.arange(pieces).unsqueeze(1)
    slot = torch.arange(window).unsqueeze(0)
    # local: piece g holds the contiguous run g*w .. g*w + w - 1; dilated: piece g holds g, g+n, g+2n, ...
    return group * window + slot if branch == "local" else slot * pieces + group


def _branch_slots(grid: Grid, plan: WindowPlan, branch: Branch) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat token index and validity of every slot of one branch, shaped ``[G, S]``."""
    T, H, W = grid
    n_t, n_h, n_w = plan.pieces
    w_t, w_h, w_w = plan.window(grid)
    t = _axis_slots(T, n_t, w_t, branch)[:, None, None, :, None, None]
    h = _axis_slots(H, n_h, w_h, branch)[None, :, None, None, :, None]
    w = _axis_slots(W, n_w, w_w, branch)[None, None, :, None, None, :]
    valid = (t < T) & (h < H) & (w < W)  # [n_t, n_h, n_w, w_t, w_h, w_w]
    flat = (t * H + h) * W + w
    G, S = plan.num_groups, w_t * w_h * w_w
    return flat.reshape(G, S), valid.reshape(G, S)


@functools.lru_cache(maxsize=256)
def _group_index_cpu(grid: Grid, plan: WindowPlan, branches: tuple[Branch, ...]) -> GroupIndex:
    L = grid[0] * grid[1] * grid[2]
    G, S = plan.num_groups, plan.group_size(grid)
    flats, valids = zip(*(_branch_slots(grid, plan, b) for b in branches), strict=True)
    flat = torch.cat(flats)  # [nb*G, S]
    valid = torch.cat(valids)
    nb = len(branches)

    # Padded slots read token 0's row of their own tensor: any real index works because they are
    # masked as keys and never read back as queries. A group with no real token is left unmasked.
    has_padding = not bool(valid.all())
    gather = torch.where(valid, flat, torch.zeros_like(flat)).flatten()
    key_valid = slot_valid = None
    if has_padding:
        key_valid = valid | ~valid.any(dim=1, keepdim=True)
        slot_valid = valid

    packed_gather = flat.flatten()[valid.flatten()]
    lengths = valid.sum(dim=1)
    lengths = lengths[lengths > 0]
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0)

    identity = nb == 1 and not has_padding and torch.equal(gather, torch.arange(L))
    return GroupIndex(
        grid=grid,
        plan=plan,
        branches=branches,
        num_branches=nb,
        num_groups=G,
        group_size=S,
        gather=None if identity else gather,
        key_valid=key_valid,
        slot_valid=slot_valid,
        packed_gather=packed_gather,
        packed_cu_seqlens=cu,
        packed_offsets=tuple(cu.tolist()),
    )


@functools.lru_cache(maxsize=256)
def _group_index_on(
    grid: Grid, plan: WindowPlan, branches: tuple[Branch, ...], device: torch.device
) -> GroupIndex:
    return _group_index_cpu(grid, plan, branches).to(device)


def group_index(
    grid: Grid, plan: WindowPlan, branches: tuple[str, ...], device: torch.device | str = "cpu"
) -> GroupIndex:
    """Cached index maps for ``branches`` of ``plan`` on ``grid``, on ``device``."""
    grid = check_grid(grid)
    plan.check(grid)
    return _group_index_on(grid, plan, check_branches(branches), torch.device(device))


def group_ids(grid: Grid, plan: WindowPlan, branch: Branch) -> torch.Tensor:
    """``[L]`` group id of every token under one partition, from the definition (no index maps).

    Used by the dense masked reference: two tokens may attend to each other iff their ids match.
    """
    T, H, W = check_grid(grid)
    plan.check(grid)
    w_t, w_h, w_w = plan.window(grid)
    t = torch.arange(T).view(T, 1, 1)
    h = torch.arange(H).view(1, H, 1)
    w = torch.arange(W).view(1, 1, W)
    if branch == "local":
        gt, gh, gw = t // w_t, h // w_h, w // w_w
    elif branch == "dilated":
        gt, gh, gw = t % plan.n_t, h % plan.n_h, w % plan.n_w
    else:
        raise ValueError(f"branch must be one of ('local', 'dilated'), got {branch!r}")
    return ((gt * plan.n_h + gh) * plan.n_w + gw).flatten()

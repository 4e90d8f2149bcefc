"""Work assignment: which rank of an SP group computes which T3 attention groups of one layer.

The unit of work is ``(branch, group, head)``: one attention group of one branch for one head. Every
unit of a layer costs the same, ``S^2`` scores for groups of ``S`` slots (`t3.attention.flops` counts
padded slots, as the kernels compute them), so the work of a rank is its number of units and the
balance of a layer is ``max units / mean units``. Groups made only of padding are no unit at all.

A unit needs the q, k, v rows ``(token, head)`` of its group's tokens; a row that lives on another
rank (`t3.parallel.layout`) is sent there. A row goes to at most one rank per branch computed, and
only once to a rank computing both of its branches, so the forward sends each row 0, 1 or 2 times.

Three candidate assignments per layer; `assign_layer` keeps the one that moves the fewest rows among
those within ``max_imbalance``, else the best balanced one:

- ``owner``: every unit on the rank holding most of its group's tokens. Groups inside one shard
  (whole frames on frame-aligned shards) move nothing; the balance is whatever the layout gives.
- ``heads``: units in (head, branch, group) order cut into ``sp`` contiguous runs of equal size. When
  ``sp`` divides the heads every rank gets whole heads, each row goes to one rank: Ulysses exactly.
  Otherwise a rank gets whole heads plus part of one (e.g. one branch of it): balanced to one unit.
- ``resident``: groups with at least half of their tokens on one rank go there (then to the next
  largest holders) up to an equal quota; the rest is cut as in ``heads``. Balanced to one unit,
  while whole-frame groups move only their stragglers.

Assignments are pure arithmetic on the CPU, computed once per (layout, plan, branches, heads).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

from t3.attention.index import group_ids, group_index
from t3.attention.plan import Branch, Grid, WindowPlan, check_branches
from t3.parallel.layout import ShardLayout

POLICIES: tuple[str, ...] = ("auto", "owner", "resident", "heads")

#: Imbalance (max over mean units, minus one) that `assign_layer` accepts to move fewer rows.
DEFAULT_MAX_IMBALANCE = 0.05


@dataclass(frozen=True)
class GroupPairs:
    """The tokens of one layer grouped by their group in each computed branch, counted per rank.

    Tokens with the same groups go to the same ranks, so exchange volumes are sums over these classes.

    Attributes:
        groups: ``[P, nb]`` group id in each branch of each class (P distinct combinations).
        held: ``[P, sp]`` tokens of each class held by each rank.
    """

    groups: torch.Tensor
    held: torch.Tensor


@functools.lru_cache(maxsize=64)
def group_pairs(layout: ShardLayout, plan: WindowPlan, branches: tuple[Branch, ...]) -> GroupPairs:
    """`GroupPairs` of ``layout``'s grid under ``plan`` for the computed ``branches``."""
    grid, sp = layout.grid, layout.sp
    num_groups = plan.num_groups
    key = torch.zeros(layout.num_tokens, dtype=torch.long)
    for branch in branches:
        key = key * num_groups + group_ids(grid, plan, branch)
    key = key * sp + layout.owner(torch.arange(layout.num_tokens))
    domain = num_groups ** len(branches) * sp
    if domain <= 1 << 24:  # counting beats sorting while the key range is small
        count = torch.bincount(key, minlength=domain)
        keys = torch.nonzero(count).flatten()
        count = count[keys]
    else:
        keys, count = torch.unique(key, return_counts=True)
    combos, which = torch.unique_consecutive(keys // sp, return_inverse=True)  # keys are sorted
    held = torch.zeros(combos.numel(), sp, dtype=torch.long)
    held.index_put_((which, keys % sp), count, accumulate=True)
    groups = []
    for _ in branches:
        groups.append(combos % num_groups)
        combos = combos // num_groups
    return GroupPairs(groups=torch.stack(groups[::-1], dim=1), held=held)


def owner_counts(layout: ShardLayout, plan: WindowPlan, branches: tuple[Branch, ...]) -> torch.Tensor:
    """``[nb, G, sp]`` tokens of each group (per computed branch) held by each rank."""
    pairs = group_pairs(layout, plan, branches)
    nb, G, sp = len(branches), plan.num_groups, layout.sp
    counts = torch.zeros(nb, G, sp, dtype=torch.long)
    for b in range(nb):
        counts[b].index_add_(0, pairs.groups[:, b], pairs.held)
    return counts


@dataclass(frozen=True, eq=False)
class LayerAssignment:
    """Who computes what in one layer, and what it costs.

    Attributes:
        layout, plan, branches, heads: what it is for (``branches`` as computed).
        policy: the candidate it is (``owner``, ``resident`` or ``heads``).
        rank_of: ``[nb, G, N]`` rank computing each unit; -1 for groups made only of padding.
        units: units per rank.
        sent_rows: per rank, ``(token, head)`` rows it sends to other ranks in the forward exchange
            (each carries q, k, v; as many partial outputs come back).
        received_rows: per rank, rows it receives from other ranks.
        kept_rows: per rank, rows of its own shard it computes on (sent to itself: no transfer).
    """

    layout: ShardLayout
    plan: WindowPlan
    branches: tuple[Branch, ...]
    heads: int
    policy: str
    rank_of: torch.Tensor
    units: tuple[int, ...]
    sent_rows: tuple[int, ...]
    received_rows: tuple[int, ...]
    kept_rows: tuple[int, ...]

    @property
    def group_size(self) -> int:
        return self.plan.group_size(self.layout.grid)

    @property
    def imbalance(self) -> float:
        """Largest per-rank work over the mean, minus one (0 is perfect balance)."""
        total = sum(self.units)
        return max(self.units) * self.layout.sp / total - 1.0 if total else 0.0

    @property
    def moved_rows(self) -> int:
        """Rows sent between ranks in the forward exchange, over the whole SP group."""
        return sum(self.sent_rows)

    @property
    def exchanges(self) -> bool:
        """Whether any row leaves its rank (False: the layer runs without collectives)."""
        return self.moved_rows > 0


def _quotas(units: int, sp: int) -> torch.Tensor:
    """Units per rank for perfect balance (differing by at most one)."""
    base, extra = divmod(units, sp)
    return torch.tensor([base + (r < extra) for r in range(sp)], dtype=torch.long)


def _fill(desired: torch.Tensor, remaining: torch.Tensor) -> torch.Tensor:
    """Accept units (in priority order) on their ``desired`` rank while its ``remaining`` quota lasts.

    Returns a mask of the accepted units and lowers ``remaining`` in place. ``desired`` -1: none.
    """
    order = torch.argsort(desired, stable=True)
    ranks = desired[order]
    position = torch.arange(ranks.numel()) - torch.searchsorted(ranks, ranks)
    fits = (ranks >= 0) & (position < remaining[ranks.clamp(min=0)])
    accepted = torch.zeros_like(fits)
    accepted[order] = fits
    remaining -= torch.bincount(desired[accepted], minlength=remaining.numel())
    return accepted


def _cut(remaining: torch.Tensor, units: int) -> torch.Tensor:
    """Ranks for ``units`` consecutive units filling each rank's ``remaining`` quota in rank order."""
    return torch.searchsorted(torch.cumsum(remaining, 0), torch.arange(units), right=True)


def _unit_order(real: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(branch, group, head)`` of every unit, in (head, branch, group) order; empty groups left out."""
    b, g = torch.nonzero(real > 0, as_tuple=True)
    h = torch.arange(heads).repeat_interleave(b.numel())
    return b.repeat(heads), g.repeat(heads), h


def _owner_policy(counts: torch.Tensor, real: torch.Tensor, heads: int) -> torch.Tensor:
    rank_of = counts.argmax(dim=-1, keepdim=True).expand(*real.shape, heads).clone()
    rank_of[real == 0] = -1
    return rank_of


def _heads_policy(counts: torch.Tensor, real: torch.Tensor, heads: int) -> torch.Tensor:
    b, g, h = _unit_order(real, heads)
    rank_of = torch.full((*real.shape, heads), -1, dtype=torch.long)
    rank_of[b, g, h] = _cut(_quotas(b.numel(), counts.shape[-1]), b.numel())
    return rank_of


def _resident_policy(counts: torch.Tensor, real: torch.Tensor, heads: int) -> torch.Tensor:
    sp = counts.shape[-1]
    b, g, h = _unit_order(real, heads)
    remaining = _quotas(b.numel(), sp)
    rank_of = torch.full((*real.shape, heads), -1, dtype=torch.long)
    free = torch.ones(b.numel(), dtype=torch.bool)

    # Groups with at least half of their tokens on one rank, most concentrated first; each goes to
    # its largest holders in turn (the k-th largest at round k) while their quotas last.
    share = counts.max(dim=-1).values / real.clamp(min=1)
    resident = share[b, g] >= 0.5
    priority = torch.argsort(-share[b, g], stable=True)  # stable: ties keep (head, branch, group) order
    holders = torch.argsort(counts, dim=-1, descending=True, stable=True)  # [nb, G, sp]
    for k in range(sp):
        candidates = priority[free[priority] & resident[priority]]
        if candidates.numel() == 0:
            break
        rank = holders[b[candidates], g[candidates], k]
        holds = counts[b[candidates], g[candidates], rank] > 0
        accepted = _fill(torch.where(holds, rank, torch.full_like(rank, -1)), remaining)
        chosen = candidates[accepted]
        rank_of[b[chosen], g[chosen], h[chosen]] = rank[accepted]
        free[chosen] = False

    rest = torch.nonzero(free).flatten()  # still in (head, branch, group) order
    rank_of[b[rest], g[rest], h[rest]] = _cut(remaining, rest.numel())
    return rank_of


_POLICIES = {"owner": _owner_policy, "resident": _resident_policy, "heads": _heads_policy}


def _exchanged_rows(
    pairs: GroupPairs, rank_of: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows ``(token, head)`` each rank sends to and receives from other ranks under ``rank_of``, and
    the rows of its own it computes on.

    A row goes to each distinct rank computing one of its branches, except a rank that already holds
    it. Summed over classes ``p`` (``held[p, r]`` of its tokens on rank ``r``, ``n_p`` in all) and heads:
    ``received[q]`` adds ``n_p - held[p, q]`` for every branch sending (p, h) to q, ``sent[r]`` adds
    ``held[p, r]`` for every branch sending (p, h) to a rank other than r. Heads with the same
    assignment count once with their multiplicity; a head computed wholly on one rank q (Ulysses-like)
    has the closed form: every row not on q moves, once.
    """
    held = pairs.held
    sp = held.shape[1]
    nb, G, _ = rank_of.shape
    patterns, which = torch.unique(rank_of.view(nb * G, -1).T, dim=0, return_inverse=True)  # [K, nb*G]
    multiplicity = torch.bincount(which, minlength=patterns.shape[0])
    lowest = torch.where(patterns >= 0, patterns, sp).min(dim=1).values
    uniform = lowest == patterns.max(dim=1).values

    per_rank = held.sum(dim=0)  # tokens on each rank
    m = torch.zeros(sp, dtype=torch.long).index_add_(0, lowest[uniform], multiplicity[uniform])
    received = m * (per_rank.sum() - per_rank)
    sent = per_rank * (m.sum() - m)
    kept = per_rank * m

    columns = patterns[~uniform].T.reshape(nb, G, -1)  # [nb, G, K'] remaining head assignments
    weight = multiplicity[~uniform]
    total = held.sum(dim=1, keepdim=True)  # [P, 1]
    seen: list[torch.Tensor] = []
    for b in range(nb):
        dest = columns[b][pairs.groups[:, b]]  # [P, K']
        new = torch.ones_like(dest, dtype=torch.bool)  # a rank an earlier branch sent to gets nothing more
        for earlier in seen:
            new &= dest != earlier
        seen.append(dest)
        heads = new * weight  # [P, K'] heads of class p this branch sends to dest
        on_dest = held.gather(1, dest)
        received.index_add_(0, dest.flatten(), ((total - on_dest) * heads).flatten())
        own = torch.zeros_like(kept).index_add_(0, dest.flatten(), (on_dest * heads).flatten())
        kept += own
        sent += (held * heads.sum(dim=1, keepdim=True)).sum(dim=0) - own  # dest keeps its own rows
    return sent, received, kept


def _costed(
    layout: ShardLayout,
    plan: WindowPlan,
    branches: tuple[Branch, ...],
    heads: int,
    policy: str,
    rank_of: torch.Tensor,
) -> LayerAssignment:
    sp = layout.sp
    assigned = rank_of[rank_of >= 0]
    units = torch.bincount(assigned, minlength=sp)

    sent, received, kept = _exchanged_rows(group_pairs(layout, plan, branches), rank_of)
    return LayerAssignment(
        layout=layout,
        plan=plan,
        branches=branches,
        heads=heads,
        policy=policy,
        rank_of=rank_of,
        units=tuple(units.tolist()),
        sent_rows=tuple(sent.tolist()),
        received_rows=tuple(received.tolist()),
        kept_rows=tuple(kept.tolist()),
    )


def _check(
    layout: ShardLayout, plan: WindowPlan, branches: tuple[str, ...], heads: int
) -> tuple[Branch, ...]:
    plan.check(layout.grid)
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise ValueError(f"heads must be an integer >= 1, got {heads!r}")
    return check_branches(branches)


@functools.lru_cache(maxsize=256)
def layer_candidates(
    layout: ShardLayout, plan: WindowPlan, branches: tuple[Branch, ...], heads: int
) -> dict[str, LayerAssignment]:
    """Every candidate assignment of one layer, by policy name (``owner``, ``resident``, ``heads``)."""
    branches = _check(layout, plan, branches, heads)
    counts = owner_counts(layout, plan, branches)
    real = counts.sum(dim=-1)
    candidates: dict[str, LayerAssignment] = {}
    for name, policy in _POLICIES.items():
        rank_of = policy(counts, real, heads)
        same = next((a for a in candidates.values() if torch.equal(a.rank_of, rank_of)), None)
        if same is not None:  # e.g. no group is resident anywhere: costs are the same
            candidates[name] = dataclasses.replace(same, policy=name)
        else:
            candidates[name] = _costed(layout, plan, branches, heads, name, rank_of)
    return candidates


def choose(candidates: dict[str, LayerAssignment], max_imbalance: float) -> LayerAssignment:
    """The candidate moving the fewest rows within ``max_imbalance``, else the best balanced one."""
    options = list(candidates.values())
    within = [a for a in options if a.imbalance <= max_imbalance + 1e-12]
    if within:
        return min(within, key=lambda a: (a.moved_rows, a.imbalance))
    return min(options, key=lambda a: (a.imbalance, a.moved_rows))


def assign_layer(
    layout: ShardLayout,
    plan: WindowPlan,
    branches: tuple[str, ...],
    heads: int,
    policy: str = "auto",
    max_imbalance: float = DEFAULT_MAX_IMBALANCE,
) -> LayerAssignment:
    """The assignment of one layer's units to the ranks of ``layout``.

    Args:
        layout: the token shards of the SP group.
        plan: the layer's window plan on ``layout.grid``.
        branches: the branches computed (after any sharing of identical ones).
        heads: attention heads ``N``.
        policy: ``auto`` (fewest moved rows within ``max_imbalance``), or one candidate by name.
        max_imbalance: largest accepted ``max / mean - 1`` of per-rank work under ``auto``.
    """
    if policy not in POLICIES:
        raise ValueError(f"sequence-parallel policy must be one of {POLICIES}, got {policy!r}")
    if not 0.0 <= max_imbalance:
        raise ValueError(f"max_imbalance must be >= 0, got {max_imbalance!r}")
    candidates = layer_candidates(layout, plan, _check(layout, plan, branches, heads), heads)
    return choose(candidates, max_imbalance) if policy == "auto" else candidates[policy]


def group_tokens(grid: Grid, plan: WindowPlan, branch: Branch) -> tuple[torch.Tensor, torch.Tensor]:
    """``([G, S] token index, [G, S] real-token mask)`` of every slot of one branch's groups."""
    index = group_index(grid, plan, (branch,))
    G, S = index.num_groups, index.group_size
    tokens = torch.arange(G * S) if index.gather is None else index.gather
    valid = torch.ones(G, S, dtype=torch.bool) if index.slot_valid is None else index.slot_valid
    return tokens.view(G, S), valid

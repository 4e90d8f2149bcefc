"""What sequence parallelism costs per layer: bytes exchanged and attention MACs per rank.

Bytes of one layer's forward, over the whole SP group (the backward moves the same again):

- T3-aware (this package): ``4 * moved_rows * D * e``: each moved ``(token, head)`` row carries q, k and
  v (``3 D`` values) to a rank computing one of its groups and one partial output (``D`` values) back;
  ``moved_rows`` counts a row once per distinct other rank it goes to (0, 1 or 2 times);
- Ulysses (all-to-all by heads, `deepspeed/sequence/layer.py`): every rank sends ``(sp - 1) / sp`` of
  its q, k, v rows out and gets as many outputs back: ``4 * L * N * D * e * (sp - 1) / sp``. It needs
  ``N`` divisible by ``sp``; the formula is still the yardstick where it does not apply.

``L`` tokens, ``N`` heads, ``D`` head dim, ``e`` bytes per value. Per-rank attention MACs: units x
``S^2 * 2 * D`` (as `t3.attention.flops.plan_attention_macs` counts a group).
"""

from __future__ import annotations

from dataclasses import dataclass

from t3.attention.plan import Grid
from t3.attention.schedule import Schedule
from t3.parallel.assignment import DEFAULT_MAX_IMBALANCE, LayerAssignment, assign_layer
from t3.parallel.layout import shard_layout


def ulysses_rows(num_tokens: int, heads: int, sp: int) -> float:
    """Rows ``(token, head)`` Ulysses moves between ranks in one layer's forward: ``L * N * (sp - 1) / sp``."""
    return num_tokens * heads * (sp - 1) / sp


def exchange_bytes(rows: float, head_dim: int, bytes_per_value: int) -> float:
    """Bytes of one layer's forward exchange for ``rows`` moved rows: q, k, v out, output back."""
    return 4 * rows * head_dim * bytes_per_value


@dataclass(frozen=True)
class LayerCost:
    """One layer under SP: its assignment and the figures derived from it."""

    layer: int
    assignment: LayerAssignment
    head_dim: int

    @property
    def macs_per_rank(self) -> tuple[int, ...]:
        unit = self.assignment.group_size**2 * 2 * self.head_dim
        return tuple(n * unit for n in self.assignment.units)

    @property
    def ulysses_rows(self) -> float:
        layout = self.assignment.layout
        return ulysses_rows(layout.num_tokens, self.assignment.heads, layout.sp)

    @property
    def bytes_vs_ulysses(self) -> float:
        """Moved rows over Ulysses' (0 when neither moves anything)."""
        return self.assignment.moved_rows / self.ulysses_rows if self.ulysses_rows else 0.0

    @property
    def buffer_rows(self) -> tuple[int, ...]:
        """Per rank, rows in its send plus receive buffers (its own kept rows in both)."""
        a = self.assignment
        return tuple(s + r + 2 * k for s, r, k in zip(a.sent_rows, a.received_rows, a.kept_rows, strict=True))

    def bytes(self, bytes_per_value: int) -> float:
        """Forward bytes of the T3-aware exchange over the SP group."""
        return exchange_bytes(self.assignment.moved_rows, self.head_dim, bytes_per_value)

    def ulysses_bytes(self, bytes_per_value: int) -> float:
        return exchange_bytes(self.ulysses_rows, self.head_dim, bytes_per_value)


def schedule_costs(
    schedule: Schedule,
    grid: Grid,
    num_layers: int,
    heads: int,
    head_dim: int,
    sp: int,
    *,
    align: str = "tokens",
    policy: str = "auto",
    max_imbalance: float = DEFAULT_MAX_IMBALANCE,
) -> list[LayerCost]:
    """The `LayerCost` of each of ``num_layers`` layers of ``schedule`` on ``grid`` at SP size ``sp``."""
    layout = shard_layout(grid, sp, align)
    return [
        LayerCost(
            layer=lp.layer,
            assignment=assign_layer(layout, lp.plan, lp.computed, heads, policy, max_imbalance),
            head_dim=head_dim,
        )
        for lp in schedule.plans(grid, num_layers)
    ]

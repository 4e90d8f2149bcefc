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

Per GPU (rank ``r``), what the training-step figures of the dry run add up:

- sent in one layer's forward: ``D * e * (3 * sent[r] + received[r])`` (q, k, v of its rows that leave,
  the partial outputs of the rows it computed for others); summed over ranks, the group's bytes above;
- held by one layer's attention: ``4 * D * e * (n_send + n_recv + units * S)``: the send and receive
  buffers of q, k, v (``3 D`` per row) and of the partial outputs (``D``), and the kernel's grouped
  q, k, v and output over its units' ``S`` slots each (`t3.memory.activation_memory` takes the largest);
- the output gather (`t3.parallel.comm.gather_tokens`): ``(sp - 1) * P * C * e`` for the ``P``-row
  shard of the ``C``-wide ``proj_out`` output, as much again for its reduce-scatter in backward.

A training step runs each layer's exchange in the forward, again in the backward (the gradients take
the reverse path) and, with per-block checkpointing, once more in the recomputed forward; the output
gather is outside the checkpointed blocks (forward and backward only). Every pass moves ``B`` samples
of a micro-batch, ``accumulate`` times per step (`step_communication`).
"""

from __future__ import annotations

from dataclasses import dataclass

from t3.attention.plan import Grid
from t3.attention.schedule import Schedule
from t3.parallel.assignment import DEFAULT_MAX_IMBALANCE, LayerAssignment, assign_layer
from t3.parallel.layout import ShardLayout, shard_layout


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

    @property
    def slot_rows(self) -> tuple[int, ...]:
        """Per rank, rows of its units' grouped q, k, v and outputs: units x ``S`` (padded slots included)."""
        return tuple(n * self.assignment.group_size for n in self.assignment.units)

    def sent_bytes(self, bytes_per_value: int) -> tuple[float, ...]:
        """Per rank, bytes it sends in the forward: q, k, v of rows leaving it, outputs of rows it computed."""
        a = self.assignment
        unit = self.head_dim * bytes_per_value
        return tuple(unit * (3 * s + r) for s, r in zip(a.sent_rows, a.received_rows, strict=True))

    def attention_bytes(self, bytes_per_value: int) -> tuple[float, ...]:
        """Per rank, bytes one sample's self-attention holds in this layer: ``4 D e (buffers + slots)``."""
        unit = 4 * self.head_dim * bytes_per_value
        return tuple(unit * (b + s) for b, s in zip(self.buffer_rows, self.slot_rows, strict=True))

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


def peak_attention_bytes(costs: list[LayerCost], bytes_per_value: int) -> float:
    """The most bytes any layer's self-attention holds on any rank, per sample (`LayerCost.attention_bytes`)."""
    return max(max(c.attention_bytes(bytes_per_value)) for c in costs)


def gather_bytes(layout: ShardLayout, out_width: int, bytes_per_value: int) -> float:
    """Bytes each rank sends to gather one sample's output shards ``[P, out_width]``: ``(sp - 1) P C e``."""
    return (layout.sp - 1) * layout.shard_size * out_width * bytes_per_value


@dataclass(frozen=True)
class StepCommunication:
    """Bytes one GPU of an SP group sends in one training step (the rank sending most).

    Attributes:
        exchange: the T3-aware q, k, v / output exchange of every layer, all passes.
        ulysses: the same passes under Ulysses (all-to-all by heads), the yardstick.
        gather: the output gather, forward and backward.
        passes: exchange passes per micro-batch (forward, backward, recompute under checkpointing).
        micro_batches: micro-batches per step on this GPU (accumulation).
    """

    exchange: float
    ulysses: float
    gather: float
    passes: int
    micro_batches: int

    @property
    def total(self) -> float:
        return self.exchange + self.gather


def step_communication(
    costs: list[LayerCost],
    *,
    out_width: int,
    bytes_per_value: int,
    micro_batch: int,
    accumulate: int,
    checkpointing: bool,
) -> StepCommunication:
    """What one GPU sends per training step under SP (see the module docstring for the passes).

    Args:
        costs: `schedule_costs` of every layer of the model.
        out_width: columns of ``proj_out``'s output (out channels x patch volume), gathered at the end.
        bytes_per_value: 2 in bf16, 4 in float32.
        micro_batch: samples per micro-batch ``B``.
        accumulate: micro-batches per optimizer step.
        checkpointing: per-block gradient checkpointing (the forward exchange runs again in backward).
    """
    sp = costs[0].assignment.layout.sp
    passes = 3 if checkpointing else 2
    scale = passes * micro_batch * accumulate
    per_rank = [sum(ranks) for ranks in zip(*(c.sent_bytes(bytes_per_value) for c in costs), strict=True)]
    ulysses = sum(c.ulysses_bytes(bytes_per_value) for c in costs) / sp
    gather = gather_bytes(costs[0].assignment.layout, out_width, bytes_per_value)
    return StepCommunication(
        exchange=scale * max(per_rank),
        ulysses=scale * ulysses,
        gather=2 * micro_batch * accumulate * gather,
        passes=passes,
        micro_batches=accumulate,
    )

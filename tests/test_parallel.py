"""Sequence parallelism in one process: layouts, assignments on the real 4K schedules, exchange plans.

The exchange is checked end to end with the collectives simulated (each rank's send buffer split and
routed in process), against `t3_attention` over the whole sequence, forward and gradients. The real
collectives, hooks and gradients of whole models run in `test_parallel_distributed.py`.
"""

from __future__ import annotations

import math

import pytest
import torch

import t3
from t3.attention import BRANCHES, WindowPlan, backends, get_schedule, t3_attention
from t3.attention.backends import KERNELS
from t3.attention.index import group_ids
from t3.attention.plan import effective_branches
from t3.attention.schedule import WAN21_4K_GRID, WAN22_4K_GRID
from t3.models.tiny import tiny_dit
from t3.parallel import (
    LayoutError,
    apply_sequence_parallel,
    assign_layer,
    check_sequence_parallel,
    check_world,
    data_parallel_rank,
    exchange_plan,
    group_ranks,
    layer_candidates,
    loss_scale,
    shard_layout,
)
from t3.parallel.assignment import owner_counts
from t3.parallel.attention import attend_rows, pack_rows, unpack_rows
from t3.parallel.cost import schedule_costs, ulysses_rows

from .test_attention_op import _reference_flash_func, _reference_flash_varlen


@pytest.fixture(autouse=True)
def _one_thread():
    # The assignment arithmetic is many small ops: one thread avoids OpenMP contention on a busy CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- layout


def test_token_layout_is_even_and_frame_layout_cuts_on_frames():
    tokens = shard_layout(WAN21_4K_GRID, 8, "tokens")
    assert tokens.counts == (85680,) * 8 and not tokens.frame_aligned
    frames = shard_layout(WAN21_4K_GRID, 8, "frames")
    assert [c // (136 * 240) for c in frames.counts] == [3, 3, 3, 3, 3, 2, 2, 2] and frames.frame_aligned
    assert frames.token_imbalance == pytest.approx(3 / 2.625 - 1)  # the +14% of 3 vs 2.625 frames
    # sp dividing the frames: both cuts are the same frame-aligned layout.
    assert shard_layout(WAN21_4K_GRID, 7, "tokens").starts == shard_layout(WAN21_4K_GRID, 7, "frames").starts


def test_shards_pad_to_one_size_and_gather_back_exactly():
    layout = shard_layout((3, 5, 5), 4)  # 75 tokens: 19, 19, 19, 18
    assert layout.counts == (19, 19, 19, 18) and layout.shard_size == 19
    x = torch.randn(2, 75, 3)
    shards = [layout.shard(x, r) for r in range(4)]
    assert all(s.shape == (2, 19, 3) for s in shards) and not shards[3][:, 18:].any()
    gathered = torch.cat(shards, dim=1).index_select(1, layout.padded_positions())
    assert torch.equal(gathered, x)
    assert layout.owner(torch.tensor([0, 18, 19, 57, 74])).tolist() == [0, 0, 1, 3, 3]


@pytest.mark.parametrize(
    ("grid", "sp", "align", "message"),
    [
        (WAN21_4K_GRID, 22, "frames", "sequence_parallel_size=22 cannot cut 21 latent frames"),
        ((1, 2, 2), 5, "tokens", "sequence_parallel_size=5 exceeds the 4 tokens"),
        ((4, 4, 4), 0, "tokens", "sequence_parallel_size must be an integer >= 1, got 0"),
        ((4, 4, 4), 2, "rows", "align must be one of"),
    ],
)
def test_bad_sp_fails_in_one_line_naming_the_key(grid, sp, align, message):
    with pytest.raises(LayoutError, match=message) as err:
        check_sequence_parallel(grid, sp, align)
    assert "\n" not in str(err.value)


def test_world_size_must_be_a_multiple_of_sp():
    assert group_ranks(8, 4) == ([[0, 1, 2, 3], [4, 5, 6, 7]], [[0, 4], [1, 5], [2, 6], [3, 7]])
    with pytest.raises(
        ValueError, match=r"sequence_parallel_size=4 does not divide the world size 6 .*1, 2, 3, 6"
    ):
        check_world(6, 4)


def test_data_parallel_rank_is_the_sp_group():
    # 8 ranks, SP groups of 2: ranks 2k and 2k + 1 read stream k of 4 (what the ranks of group_ranks share).
    assert [data_parallel_rank(r, 8, 2) for r in range(8)] == [(r // 2, 4) for r in range(8)]
    assert [data_parallel_rank(r, 3, 1) for r in range(3)] == [(0, 3), (1, 3), (2, 3)]
    for stream, ranks in enumerate(group_ranks(8, 4)[0]):
        assert {data_parallel_rank(r, 8, 4) for r in ranks} == {(stream, 2)}


def test_loss_scale_makes_the_engine_average_exact():
    assert loss_scale(8, 4) == 1.0  # DDP, ZeRO, FSDP2: sum over all ranks / world size
    assert loss_scale(8, 4, gradient_divisor=2) == 0.25  # an engine dividing by the data-parallel size
    with pytest.raises(ValueError, match="gradient_divisor must be a positive integer"):
        loss_scale(8, 4, gradient_divisor=0)


# ---------------------------------------------------------------- assignment and its costs


def _rows_by_brute_force(assignment) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Rows sent, received and kept per rank, counted token by token and head by head."""
    layout = assignment.layout
    owner = layout.owner(torch.arange(layout.num_tokens)).tolist()
    ids = [group_ids(layout.grid, assignment.plan, b) for b in assignment.branches]
    sent, received, kept = [0] * layout.sp, [0] * layout.sp, [0] * layout.sp
    for x in range(layout.num_tokens):
        for h in range(assignment.heads):
            for dest in {int(assignment.rank_of[b, ids[b][x], h]) for b in range(len(ids))}:
                if dest == owner[x]:
                    kept[dest] += 1
                else:
                    sent[owner[x]] += 1
                    received[dest] += 1
    return tuple(sent), tuple(received), tuple(kept)


@pytest.mark.parametrize(
    ("grid", "plan", "sp", "align"),
    [
        ((5, 6, 7), WindowPlan(1, 2, 3), 3, "tokens"),  # padded spread windows
        ((5, 6, 7), WindowPlan(5, 1, 1), 4, "tokens"),  # whole frames straddling shards
        ((4, 4, 6), WindowPlan(2, 3, 2), 2, "frames"),
        ((3, 5, 5), WindowPlan(3, 2, 4), 5, "tokens"),
    ],
)
def test_exchanged_rows_equal_a_token_by_token_count(grid, plan, sp, align):
    layout = shard_layout(grid, sp, align)
    for branches in (("local", "dilated"), ("dilated",)):
        computed = effective_branches(plan, grid, branches)
        for assignment in layer_candidates(layout, plan, computed, 3).values():
            counted = (assignment.sent_rows, assignment.received_rows, assignment.kept_rows)
            assert counted == _rows_by_brute_force(assignment)
            # Every (branch, group, head) with a real token is computed once; groups of padding never.
            nonempty = owner_counts(layout, plan, computed).sum(dim=-1) > 0
            assert torch.equal(assignment.rank_of >= 0, nonempty.unsqueeze(-1).expand(-1, -1, 3))
            assert sum(assignment.units) == 3 * int(nonempty.sum())


@pytest.mark.parametrize(
    ("schedule", "grid", "heads"), [("wan21_4k", WAN21_4K_GRID, 12), ("wan22_4k", WAN22_4K_GRID, 24)]
)
def test_4k_schedules_balanced_within_10_percent_and_at_most_twice_ulysses_bytes(schedule, grid, heads):
    for sp in range(1, 9):
        for cost in schedule_costs(get_schedule(schedule), grid, 5, heads, 128, sp):
            a = cost.assignment
            where = f"{schedule} sp={sp} layer {cost.layer} plan {a.plan} ({a.policy})"
            assert a.imbalance <= 0.10, f"{where}: imbalance {a.imbalance:.3f}"
            assert a.moved_rows <= 2 * ulysses_rows(math.prod(grid), heads, sp), where
            if heads % sp == 0:  # Ulysses applies; never worse than it
                assert a.moved_rows <= ulysses_rows(math.prod(grid), heads, sp), where
            macs = sum(cost.macs_per_rank)
            assert macs == a.group_size**2 * 2 * 128 * heads * a.plan.num_groups * len(a.branches)


def test_whole_frame_layers_skip_the_exchange_on_frame_boundaries_or_trade_it_for_balance():
    plan, frames = WindowPlan(21, 1, 1), ("local",)
    for sp in (3, 7):  # 21 frames split evenly: no q, k, v leaves its rank
        chosen = schedule_costs(get_schedule("wan21_4k"), WAN21_4K_GRID, 1, 12, 128, sp)[0].assignment
        assert not chosen.exchanges and chosen.imbalance == 0
    candidates = layer_candidates(shard_layout(WAN21_4K_GRID, 8, "frames"), plan, frames, 12)
    owner, resident = candidates["owner"], candidates["resident"]
    assert owner.moved_rows == 0 and owner.imbalance == pytest.approx(3 / 2.625 - 1)  # +14%
    assert resident.imbalance < 0.02 and 0 < resident.moved_rows < 0.15 * ulysses_rows(
        math.prod(WAN21_4K_GRID), 12, 8
    )


def test_dense_layers_split_by_heads():
    layout = shard_layout((4, 6, 8), 4)
    even = layer_candidates(layout, WindowPlan(1, 1, 1), ("local",), 8)["heads"]
    assert even.units == (2, 2, 2, 2) and even.moved_rows == ulysses_rows(192, 8, 4)  # Ulysses exactly
    odd = layer_candidates(layout, WindowPlan(1, 1, 1), ("local",), 6)["heads"]
    assert odd.units == (2, 2, 1, 1) and odd.imbalance == pytest.approx(1 / 3)  # accepted for dense only


# ---------------------------------------------------------------- exchange, simulated collectives


def simulated_sp_attention(
    q, k, v, grid, plan, branches, layout, share_identical=True, policy="auto", kernel=KERNELS["sdpa"]
):
    """`sequence_parallel_attention` on ``layout.sp`` ranks in one process: collectives by hand."""
    sp, heads = layout.sp, q.shape[2]
    computed = effective_branches(plan, grid, branches, share_identical)
    plans = [exchange_plan(layout, plan, computed, heads, r, policy=policy) for r in range(sp)]
    assignment = assign_layer(layout, plan, computed, heads, policy)
    for r, p in enumerate(plans):  # the plans move exactly the rows the assignment counts
        assert p.send_counts[r] == p.recv_counts[r] == assignment.kept_rows[r]
        assert sum(p.send_counts) - p.send_counts[r] == assignment.sent_rows[r]
        assert sum(p.recv_counts) - p.recv_counts[r] == assignment.received_rows[r]
    sends = [pack_rows(*(layout.shard(x, r) for x in (q, k, v)), plans[r]) for r in range(sp)]
    out_blocks = [torch.split(sends[r], plans[r].send_counts) for r in range(sp)]
    received = [torch.cat([out_blocks[src][dst] for src in range(sp)]) for dst in range(sp)]
    assert [sum(plans[r].recv_counts) for r in range(sp)] == [len(x) for x in received]
    partial = [attend_rows(received[r], plans[r], kernel) for r in range(sp)]
    back_blocks = [torch.split(partial[r], plans[r].recv_counts) for r in range(sp)]
    back = [torch.cat([back_blocks[src][dst] for src in range(sp)]) for dst in range(sp)]
    outs = [unpack_rows(back[r], plans[r], layout.shard_size) for r in range(sp)]
    return torch.cat([o[:, :n] for o, n in zip(outs, layout.counts, strict=True)], dim=1)


@pytest.mark.parametrize(
    ("grid", "plan", "branches", "share", "heads"),
    [
        ((5, 6, 7), WindowPlan(1, 2, 3), ("local", "dilated"), True, 3),  # padded, 3 heads
        ((5, 6, 7), WindowPlan(5, 1, 1), ("local", "dilated"), True, 3),  # whole frames, one branch computed
        ((5, 6, 7), WindowPlan(5, 1, 1), ("local", "dilated"), False, 2),  # the unshared ablation
        ((4, 4, 6), WindowPlan(2, 3, 2), ("dilated",), True, 4),
        ((4, 4, 6), WindowPlan(1, 1, 1), ("local", "dilated"), True, 3),  # dense
        ((3, 5, 5), WindowPlan(3, 2, 4), ("local",), True, 5),
    ],
)
def test_simulated_sp_attention_equals_t3_attention_forward_and_backward(grid, plan, branches, share, heads):
    L = math.prod(grid)
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(2, L, heads, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)
    )
    weight = torch.randn(2, L, heads, 8, generator=g, dtype=torch.float64)
    ref = t3_attention(q, k, v, grid, plan, branches, "sdpa", share_identical=share)
    ref_grads = torch.autograd.grad((ref * weight).sum(), (q, k, v))
    for sp in (2, 3, 5, 8):
        for align in ("tokens", "frames") if sp <= grid[0] else ("tokens",):
            for policy in ("auto", "owner", "heads"):
                layout = shard_layout(grid, sp, align)
                out = simulated_sp_attention(q, k, v, grid, plan, branches, layout, share, policy)
                torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
                grads = torch.autograd.grad((out * weight).sum(), (q, k, v))
                for got, want in zip(grads, ref_grads, strict=True):
                    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("grid", "plan"), [((5, 6, 7), WindowPlan(1, 2, 3)), ((4, 4, 6), WindowPlan(2, 2, 3))]
)
def test_simulated_sp_attention_through_the_flash_kernel_path(monkeypatch, grid, plan):
    """The received rows' groups through the flash backend's grouping and varlen packing (padded
    plans), with the pure-PyTorch stand-ins of flash-attn that the op's own tests use."""
    monkeypatch.setattr(
        backends, "_flash_functions", lambda: (_reference_flash_func, _reference_flash_varlen)
    )
    L = math.prod(grid)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, L, 3, 8, generator=g) for _ in range(3))
    ref = t3_attention(q, k, v, grid, plan, backend="sdpa")
    for sp in (2, 5):
        out = simulated_sp_attention(
            q, k, v, grid, plan, BRANCHES, shard_layout(grid, sp), kernel=KERNELS["flash"]
        )
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- applying it to a model


def test_apply_needs_a_transformed_model_and_no_group_is_a_no_op():
    model = tiny_dit()
    with pytest.raises(TypeError, match=r"t3.transform\(model, 'dense'\)"):
        apply_sequence_parallel(model, None)
    t3.transform(model, "dense")
    processors = [b.attn1.processor for b in model.blocks]
    assert apply_sequence_parallel(model, None) is model
    assert [b.attn1.processor for b in model.blocks] == processors

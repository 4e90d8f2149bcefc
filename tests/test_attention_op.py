"""t3_attention against the dense masked reference, forward and backward, for every backend."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import t3.attention.backends as backends
from t3.attention import PlanError, WindowPlan, group_index, t3_attention
from t3.attention.reference import dense_masked_attention, partition_mask, t3_attention_reference

from .conftest import requires_cuda

# (grid, plan): divisible, non-divisible, a fully padded window (T=5 in 4 pieces), degenerate axes.
CASES = [
    ((4, 6, 8), WindowPlan(2, 3, 2)),
    ((5, 7, 9), WindowPlan(2, 3, 4)),
    ((5, 4, 6), WindowPlan(4, 3, 5)),
    ((3, 4, 4), WindowPlan(3, 1, 1)),
    ((1, 5, 7), WindowPlan(1, 5, 2)),
    ((6, 6, 6), WindowPlan(1, 1, 1)),
]
BRANCH_SETS = [("local",), ("dilated",), ("local", "dilated")]


def qkv(batch, tokens, heads, dim, dtype=torch.float32, requires_grad=False):
    return [
        torch.randn(batch, tokens, heads, dim, dtype=dtype, requires_grad=requires_grad) for _ in range(3)
    ]


def test_dense_plan_reproduces_sdpa():
    q, k, v = qkv(2, 4 * 6 * 5, 3, 16)
    out = t3_attention(q, k, v, (4, 6, 5), WindowPlan(1, 1, 1), backend="sdpa")
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(
        1, 2
    )
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("grid", "plan"), CASES)
@pytest.mark.parametrize("branches", BRANCH_SETS)
@pytest.mark.parametrize(("batch", "heads"), [(1, 1), (2, 3)])
def test_forward_matches_dense_masked_reference_float32(grid, plan, branches, batch, heads):
    L = grid[0] * grid[1] * grid[2]
    q, k, v = qkv(batch, L, heads, 8)
    out = t3_attention(q, k, v, grid, plan, branches, backend="sdpa")
    ref = t3_attention_reference(q, k, v, grid, plan, branches)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# Calls of one group each, runs that straddle the two branches, one call for everything.
TOKENS_PER_CALL = [1, 40, 10**6]


@pytest.mark.parametrize(("grid", "plan"), CASES)
@pytest.mark.parametrize("tokens_per_call", TOKENS_PER_CALL)
@pytest.mark.parametrize("heads_first", [True, False])
def test_runs_of_groups_match_reference_in_both_layouts(grid, plan, tokens_per_call, heads_first):
    L = grid[0] * grid[1] * grid[2]
    q, k, v = qkv(3, L, 2, 8, dtype=torch.float64, requires_grad=True)
    index = group_index(grid, plan, ("local", "dilated"))
    out = backends.sdpa_grouped(q, k, v, index, tokens_per_call=tokens_per_call, heads_first=heads_first)
    ref = t3_attention_reference(q, k, v, grid, plan)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-8)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    for g, r in zip(grads, torch.autograd.grad(ref, (q, k, v), grad_out), strict=True):
        torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-8)


def test_tokens_per_call_splits_calls_and_rejects_bad_values(monkeypatch):
    grid, plan = (4, 6, 8), WindowPlan(2, 3, 2)  # 2 branches x 12 groups of 16 slots
    q, k, v = qkv(2, 192, 2, 8)
    calls = []
    real = F.scaled_dot_product_attention

    def counting(query, *args, **kwargs):
        calls.append(query.shape[0])
        return real(query, *args, **kwargs)

    monkeypatch.setattr(backends.F, "scaled_dot_product_attention", counting)
    for tokens, expected in [(16, [1] * 48), (40, [2] * 24), (200, [12, 12] * 2), (10**6, [24, 24])]:
        calls.clear()
        t3_attention(q, k, v, grid, plan, tokens_per_call=tokens)
        assert calls == expected, tokens  # CPU: one sample per call, runs of whole groups
    calls.clear()
    backends.sdpa_grouped(q, k, v, group_index(grid, plan, ("local", "dilated")), heads_first=False)
    assert calls == [48]  # the GPU layout, unbounded: both samples, both branches, one call
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="tokens_per_call must be a positive integer or None"):
            t3_attention(q, k, v, grid, plan, tokens_per_call=bad)


@pytest.mark.parametrize(("grid", "plan"), CASES[:3])
@pytest.mark.parametrize("branches", BRANCH_SETS)
def test_forward_bfloat16_within_twice_pytorch_error(grid, plan, branches):
    # flash-attention's rule: our bf16 error vs an fp32 reference is at most twice the error of a
    # plain PyTorch implementation run in bf16 (plus a small floor for exact ties).
    L = grid[0] * grid[1] * grid[2]
    q, k, v = qkv(2, L, 2, 16, dtype=torch.bfloat16)
    out = t3_attention(q, k, v, grid, plan, branches, backend="sdpa")
    assert out.dtype == torch.bfloat16
    ref = t3_attention_reference(q.float(), k.float(), v.float(), grid, plan, branches)
    pt = t3_attention_reference(q, k, v, grid, plan, branches)
    err, pt_err = (out.float() - ref).abs().max(), (pt.float() - ref).abs().max()
    assert err <= 2 * pt_err + 1e-3, (err, pt_err)


@pytest.mark.parametrize(("grid", "plan"), CASES[:3])
def test_under_bf16_autocast_runs_in_bf16_like_sdpa(grid, plan):
    # bf16-mixed training (Lightning's autocast over float32 weights): the DiT hands float32 q, k
    # (RMSNorm keeps its weight's dtype) and a bf16 v. SDPA casts all three to bf16 and returns bf16;
    # T3 attention must do the same, forward and backward.
    L = grid[0] * grid[1] * grid[2]
    q, k, v = qkv(1, L, 2, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = t3_attention(q, k, v.bfloat16(), grid, plan, backend="sdpa")
        ref = t3_attention_reference(q.bfloat16(), k.bfloat16(), v.bfloat16(), grid, plan)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    out.float().sum().backward()
    assert q.grad.dtype == torch.float32 and torch.isfinite(q.grad).all() and torch.isfinite(v.grad).all()


@pytest.mark.parametrize(("grid", "plan"), CASES[:5])
@pytest.mark.parametrize("branches", BRANCH_SETS)
def test_gradients_match_reference_float64(grid, plan, branches):
    L = grid[0] * grid[1] * grid[2]
    q, k, v = qkv(2, L, 2, 4, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(2, L, 2, 4, dtype=torch.float64)
    grads = torch.autograd.grad(
        t3_attention(q, k, v, grid, plan, branches, backend="sdpa"), (q, k, v), grad_out
    )
    ref = torch.autograd.grad(t3_attention_reference(q, k, v, grid, plan, branches), (q, k, v), grad_out)
    for g, r in zip(grads, ref, strict=True):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-8)


def test_each_branch_is_dense_sdpa_with_its_partition_mask():
    grid, plan = (4, 6, 8), WindowPlan(2, 2, 4)
    q, k, v = qkv(1, 192, 2, 8)
    for branch in ("local", "dilated"):
        mask = partition_mask(grid, plan, branch)
        sdpa = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
        ).transpose(1, 2)
        torch.testing.assert_close(t3_attention(q, k, v, grid, plan, (branch,)), sdpa, atol=1e-5, rtol=1e-5)
    # Sanity of the masks themselves: local groups are contiguous blocks, dilated ones strided.
    local, dilated = partition_mask(grid, plan, "local"), partition_mask(grid, plan, "dilated")
    assert local[0, 1] and not dilated[0, 1]  # w-neighbours share a block, not a stride class
    assert dilated[0, 4] and not local[0, 4]  # w=0 and w=4 are equal modulo n_w=4
    assert local.sum(1).eq(12).all() and dilated.sum(1).eq(12).all()  # window (2, 3, 2)


def test_identical_branches_computed_once_with_same_output():
    grid, plan = (3, 4, 6), WindowPlan(3, 1, 1)  # both partitions are whole frames
    q, k, v = qkv(2, 72, 2, 8)
    flops = {}
    for share in (True, False):
        with FlopCounterMode(display=False) as counter:
            out = t3_attention(q, k, v, grid, plan, share_identical=share)
        flops[share] = counter.get_total_flops()
        torch.testing.assert_close(out, t3_attention_reference(q, k, v, grid, plan), atol=1e-6, rtol=1e-6)
    assert flops[True] * 2 == flops[False]
    assert group_index(grid, plan, ("local",)).is_identity  # frames are contiguous: no gather at all


def test_index_maps_are_cached_and_cover_every_token_once_per_branch():
    a = group_index((5, 7, 9), WindowPlan(2, 3, 4), ("local", "dilated"))
    assert a is group_index((5, 7, 9), WindowPlan(2, 3, 4), ("dilated", "local"))
    L = 5 * 7 * 9
    assert a.gather.numel() == 2 * a.num_groups * a.group_size
    per_branch = a.num_groups * a.group_size
    for b in range(2):
        real = a.gather[b * per_branch : (b + 1) * per_branch][
            a.slot_valid[b * a.num_groups : (b + 1) * a.num_groups].flatten()
        ]
        assert torch.equal(real.sort().values, torch.arange(L))  # every token exactly once
        assert torch.equal(a.packed_gather[b * L : (b + 1) * L], real)
    assert a.packed_cu_seqlens[-1] == 2 * L
    assert a.packed_offsets == tuple(a.packed_cu_seqlens.tolist())


def test_no_nan_with_fully_padded_windows():
    grid, plan = (5, 4, 6), WindowPlan(4, 3, 5)  # t: 5 tokens in 4 pieces of 2 -> last local piece empty
    index = group_index(grid, plan, ("local",))
    assert (index.key_valid.sum(1) == index.group_size).any()  # an all-padding group left unmasked
    q, k, v = qkv(1, 120, 1, 4, requires_grad=True)
    out = t3_attention(q, k, v, grid, plan, ("local",))
    out.sum().backward()
    assert torch.isfinite(out).all() and all(torch.isfinite(t.grad).all() for t in (q, k, v))


def _reference_flash_func(q, k, v, softmax_scale=None):
    # Stands in for flash_attn_func on CPU: same layout [batch, seqlen, heads, head_dim].
    return dense_masked_attention(q, k, v, None, softmax_scale)


def _reference_flash_varlen(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None
):
    # Stands in for flash_attn_varlen_func: packed [total, heads, head_dim] with cumulative lengths.
    assert torch.equal(cu_seqlens_q, cu_seqlens_k) and cu_seqlens_q.dtype == torch.int32
    outs = []
    for start, end in zip(cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist(), strict=True):
        assert 0 < end - start <= max_seqlen_q
        outs.append(
            dense_masked_attention(
                q[None, start:end], k[None, start:end], v[None, start:end], None, softmax_scale
            )[0]
        )
    return torch.cat(outs)


@pytest.mark.parametrize(("grid", "plan"), CASES[:4])
@pytest.mark.parametrize("branches", BRANCH_SETS)
@pytest.mark.parametrize("tokens_per_call", [None, *TOKENS_PER_CALL[:2]])
def test_flash_backend_packing_with_reference_kernel(monkeypatch, grid, plan, branches, tokens_per_call):
    """The flash path's grouping and varlen packing, with a pure-PyTorch kernel in place of flash-attn."""
    monkeypatch.setattr(
        backends, "_flash_functions", lambda: (_reference_flash_func, _reference_flash_varlen)
    )
    L = grid[0] * grid[1] * grid[2]
    q, k, v = qkv(2, L, 2, 8)
    out = backends.flash_grouped(q, k, v, group_index(grid, plan, branches), tokens_per_call=tokens_per_call)
    torch.testing.assert_close(
        out, t3_attention(q, k, v, grid, plan, branches, backend="sdpa"), atol=1e-5, rtol=1e-5
    )


def test_backend_choice_and_errors():
    q, k, v = qkv(1, 8, 1, 8)
    assert backends.choose_backend("auto", q) == "sdpa"  # CPU float32: flash cannot run
    with pytest.raises(RuntimeError, match="backend 'flash' cannot run"):
        t3_attention(q, k, v, (2, 2, 2), WindowPlan(1, 1, 1), backend="flash")
    with pytest.raises(ValueError, match="backend must be one of"):
        t3_attention(q, k, v, (2, 2, 2), WindowPlan(1, 1, 1), backend="xformers")
    with pytest.raises(ValueError, match="grid \\(2, 2, 3\\) has 12 tokens but q has 8"):
        t3_attention(q, k, v, (2, 2, 3), WindowPlan(1, 1, 1))
    with pytest.raises(PlanError, match="layer 4: plan \\(3, 1, 1\\) cannot apply to grid \\(2, 2, 2\\)"):
        t3_attention(q, k, v, (2, 2, 2), WindowPlan(3, 1, 1), layer=4)
    with pytest.raises(ValueError, match="branches must be a non-empty subset"):
        t3_attention(q, k, v, (2, 2, 2), WindowPlan(1, 1, 1), branches=("remote",))
    with pytest.raises(ValueError, match="one shape"):
        t3_attention(q, k[:, :4], v, (2, 2, 2), WindowPlan(1, 1, 1))


@requires_cuda()
@pytest.mark.gpu
@pytest.mark.parametrize(("grid", "plan"), CASES[:3])
@pytest.mark.parametrize("backend", ["sdpa", "flash"])
def test_cuda_backends_bf16_match_reference(grid, plan, backend):
    if backend == "flash" and not backends.flash_available():
        pytest.skip("flash-attn not installed")
    L = grid[0] * grid[1] * grid[2]
    q, k, v = (t.cuda() for t in qkv(2, L, 2, 64, dtype=torch.bfloat16, requires_grad=False))
    out = t3_attention(q, k, v, grid, plan, backend=backend)
    ref = t3_attention_reference(q.float(), k.float(), v.float(), grid, plan)
    pt = t3_attention_reference(q, k, v, grid, plan)
    assert (out.float() - ref).abs().max() <= 2 * (pt.float() - ref).abs().max() + 1e-3


@pytest.mark.parametrize(
    ("grid", "plan"), [((4, 6, 8), WindowPlan(2, 3, 2)), ((3, 8, 8), WindowPlan(1, 2, 4))]
)
def test_straightforward_baseline_agrees_with_grouped_op(grid, plan):
    from t3.attention.reference import straightforward_t3_attention

    q, k, v = qkv(2, grid[0] * grid[1] * grid[2], 3, 8)
    torch.testing.assert_close(
        straightforward_t3_attention(q, k, v, grid, plan),
        t3_attention(q, k, v, grid, plan, share_identical=False),
        atol=1e-5,
        rtol=1e-5,
    )
    with pytest.raises(ValueError, match="needs a divisible grid"):
        straightforward_t3_attention(q[:, :-1], k, v, (4, 6, 8), WindowPlan(3, 1, 1))


def _graph_bytes_after_forward(regroup: bool, grid, plan) -> tuple[int, torch.Tensor]:
    from t3.profiling import TensorMemoryTracker

    q, k, v = qkv(1, grid[0] * grid[1] * grid[2], 2, 16, requires_grad=True)
    with TensorMemoryTracker() as tracker:
        out = t3_attention(q, k, v, grid, plan, regroup_in_backward=regroup)
        held = tracker.current  # the output plus what autograd keeps for backward
    out.square().sum().backward()
    return held, torch.cat([q.grad, k.grad, v.grad])


@pytest.mark.parametrize(
    ("grid", "plan"), [((4, 8, 8), WindowPlan(2, 2, 4)), ((5, 7, 9), WindowPlan(2, 3, 4))]
)
def test_regroup_in_backward_keeps_sources_not_grouped_copies(grid, plan):
    torch.manual_seed(0)
    held_copies, grads_copies = _graph_bytes_after_forward(False, grid, plan)
    torch.manual_seed(0)
    held_sources, grads_sources = _graph_bytes_after_forward(True, grid, plan)
    assert torch.equal(grads_copies, grads_sources)  # rebuilt tensors are bit-identical
    size = grid[0] * grid[1] * grid[2] * 2 * 16 * 4  # one [L, N, D] float32 tensor
    # Three grouped copies of two branches (6 sizes, more with padding) are no longer held.
    assert held_copies - held_sources >= 6 * size


def test_regroup_defers_to_activation_checkpointing(monkeypatch):
    from torch.utils.checkpoint import checkpoint

    grid, plan = (4, 8, 8), WindowPlan(2, 2, 4)
    q, k, v = qkv(1, 256, 2, 16, requires_grad=True)
    calls = []
    real = backends.regroup_in_backward

    def spy(pairs):
        calls.append(len(pairs))
        return real(pairs)

    monkeypatch.setattr(backends, "regroup_in_backward", spy)
    out = checkpoint(lambda *t: t3_attention(*t, grid, plan), q, k, v, use_reentrant=False)
    out.sum().backward()
    assert calls == []  # inside checkpoint (forward and recompute) the outer policy decides
    t3_attention(q, k, v, grid, plan).sum().backward()
    assert calls == [3]

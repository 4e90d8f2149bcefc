"""Attention kernels that run the groups of a T3 layer stacked along the batch axis.

Each kernel takes the full-sequence tensors ``[B, L, N, D]`` and a `GroupIndex`, and returns the
branch outputs averaged in token order: ``[B, L, N, D]``. Groups of both branches are gathered
in runs of consecutive groups: one run (one call) for everything on GPU unless ``tokens_per_call``
bounds it, runs of about `CPU_TOKENS_PER_CALL` slots on CPU. Each run's output is added to its
tokens with weight ``1 / nb``.

- ``sdpa``: PyTorch ``scaled_dot_product_attention`` (CPU and GPU). Padded slots are excluded
  with a boolean key mask and their outputs dropped.
- ``flash``: flash-attn 2 on CUDA (fp16/bf16). Without padding it runs ``flash_attn_func`` on equal
  groups; with padding it runs ``flash_attn_varlen_func`` on the real tokens only, so padded slots
  cost nothing.

`choose_backend` picks the fastest one that can run the given tensors.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

from t3.attention.index import GroupIndex

logger = logging.getLogger(__name__)

BACKENDS: tuple[str, ...] = ("auto", "sdpa", "flash")


@functools.cache
def _flash_functions() -> tuple[Callable, Callable] | None:
    """flash-attn 2's ``(flash_attn_func, flash_attn_varlen_func)``, or None where it does not import."""
    try:
        from flash_attn import flash_attn_func, flash_attn_varlen_func
    except (ImportError, OSError, RuntimeError) as err:  # a broken build raises OSError/RuntimeError
        logger.debug("flash-attn unavailable: %s", err)
        return None
    return flash_attn_func, flash_attn_varlen_func


# torch.compile evaluates this once while tracing instead of tracing the import (which breaks the graph).
@torch.compiler.assume_constant_result
def flash_available() -> bool:
    return _flash_functions() is not None


def can_run_flash(q: torch.Tensor) -> tuple[bool, str]:
    """Whether the flash backend can run on ``q``, and why not."""
    if not flash_available():
        return False, "flash-attn is not installed (pip install -e '.[gpu]' on a CUDA machine)"
    if not q.is_cuda:
        return False, "flash-attn needs CUDA tensors"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return False, f"flash-attn needs float16 or bfloat16, got {q.dtype}"
    if q.shape[-1] > 256 or q.shape[-1] % 8:
        return False, f"flash-attn needs head_dim <= 256 and a multiple of 8, got {q.shape[-1]}"
    return True, ""


def choose_backend(backend: str, q: torch.Tensor) -> str:
    """Resolve ``auto`` to a concrete backend and check that an explicit one can run."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "sdpa":
        return "sdpa"
    ok, why = can_run_flash(q)
    if backend == "flash":
        if not ok:
            raise RuntimeError(f"attention backend 'flash' cannot run: {why}")
        return "flash"
    if not ok and not torch.compiler.is_compiling():  # torch.compile cannot trace logging calls
        logger.debug("backend auto: sdpa (%s)", why)
    return "flash" if ok else "sdpa"


# Without autograd recording, the CPU kernels attend in runs of consecutive groups of at most this
# many slots per call (at least one group). benchmarks/attention.py on a 2-core AMD EPYC (float32,
# 12 x 128 heads, windows of 1344 tokens): 2.19 s with runs vs 2.56 s with one call at 21.5k tokens,
# 6.90 s vs 9.57 s at 64.5k. A run's gathered q, k, v stay in cache and reuse the allocator's blocks
# instead of fresh page-faulted mappings, and the forward peak is one output plus one run instead
# of 2 * nb copies of q, k, v and out.
CPU_TOKENS_PER_CALL = 4096


def _records_autograd(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def resolve_tokens_per_call(
    tokens_per_call: int | None, device: torch.device, recording: bool = False
) -> int | None:
    """Slots per attention call: the given bound, or the automatic one (None: all groups in one call).

    Automatic: one call whenever autograd records (the backward of every gather from q, k, v
    costs a full-size gradient buffer, so runs would cost ``O(runs * L)`` there), otherwise runs of
    `CPU_TOKENS_PER_CALL` slots on CPU and one call on GPU.
    """
    if tokens_per_call is None:
        return CPU_TOKENS_PER_CALL if device.type == "cpu" and not recording else None
    if isinstance(tokens_per_call, bool) or not isinstance(tokens_per_call, int) or tokens_per_call < 1:
        raise ValueError(f"tokens_per_call must be a positive integer or None, got {tokens_per_call!r}")
    return tokens_per_call


def _rows(x: torch.Tensor, samples: slice) -> torch.Tensor:
    """``x[samples]``, or ``x`` itself when that is all of it (a slice would cost a full-size
    gradient buffer per call in backward)."""
    return x if samples.start == 0 and samples.stop == x.shape[0] else x[samples]


def _calls(batch: int, groups: int, group_size: int, tokens_per_call: int | None, one_sample: bool):
    """``(samples, groups)`` slices of the attention calls: runs of whole groups within the budget."""
    if tokens_per_call is None:
        per_call, samples = groups, 1 if one_sample else batch
    else:
        per_call = max(1, min(groups, tokens_per_call // group_size))
        samples = 1
        if not one_sample and per_call == groups:
            samples = max(1, min(batch, tokens_per_call // (groups * group_size)))
    return [
        (slice(b, min(b + samples, batch)), slice(g, min(g + per_call, groups)))
        for b in range(0, batch, samples)
        for g in range(0, groups, per_call)
    ]


def _add_to_tokens(
    result: torch.Tensor,
    samples: slice,
    tokens: torch.Tensor,
    out: torch.Tensor,
    num_branches: int,
    slot_valid: torch.Tensor | None = None,
) -> None:
    """``result[samples, tokens] += out / nb``: every branch's output lands on its tokens, averaged.

    Padded slots point at a real token; their outputs are zeroed (``slot_valid``) so they add nothing.
    """
    if slot_valid is not None:
        out = out * slot_valid.reshape(1, -1, 1, 1).to(out.dtype)
    _rows(result, samples).index_add_(1, tokens, out, alpha=1.0 / num_branches)


class _Regroup:
    """A grouped copy that autograd saved for backward, stored as its source and how to rebuild it."""

    def __init__(self, source: torch.Tensor, regroup: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.source = source
        self.regroup = regroup
        self.version = source._version


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))


class regroup_in_backward(torch.autograd.graph.saved_tensors_hooks):  # noqa: N801 (a context manager)
    """Let autograd keep q, k, v once instead of their ``nb``-times larger grouped copies.

    The attention kernel saves its grouped inputs for backward. Inside this context those saved
    tensors are replaced by a reference to the ungrouped source and the grouping function, and are
    rebuilt (one copy each, bit-identical) when backward needs them. Saves ``(2 nb - 1)/(2 nb)`` of
    the attention inputs' activation memory per layer; costs one extra gather per tensor in backward.
    """

    def __init__(
        self, pairs: list[tuple[torch.Tensor, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]]
    ) -> None:
        recipes = {_storage_key(grouped): (source, regroup) for grouped, source, regroup in pairs}

        def pack(t: torch.Tensor) -> torch.Tensor | _Regroup:
            recipe = recipes.get(_storage_key(t))
            return t if recipe is None else _Regroup(*recipe)

        def unpack(saved: torch.Tensor | _Regroup) -> torch.Tensor:
            if not isinstance(saved, _Regroup):
                return saved
            if saved.source._version != saved.version:
                raise RuntimeError("t3_attention: q, k or v was modified in place after the forward pass")
            with torch.no_grad():
                return saved.regroup(saved.source)

        super().__init__(pack, unpack)


def _saves_grouped_copies(index: GroupIndex, *tensors: torch.Tensor) -> bool:
    """Whether to store sources instead of grouped copies for backward.

    Only when autograd records this call, the grouping is a real copy, and no other saved-tensor
    policy (activation checkpointing, CPU offload) is active: an outer policy already decides what is
    kept, and holding the sources inside a checkpointed block would keep them alive. Under
    ``torch.compile`` the compiler's partitioner decides what backward keeps (and saved-tensor hooks
    would break the graph).
    """
    return (
        not torch.compiler.is_compiling()
        and _records_autograd(*tensors)
        and index.gather is not None
        and torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    )


def _attend(
    kernel: Callable[..., torch.Tensor],
    grouping: Callable[[torch.Tensor], torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: GroupIndex,
    regroup: bool,
    **kwargs,
) -> torch.Tensor:
    """``kernel(grouping(q), grouping(k), grouping(v), **kwargs)``, regrouping in backward if asked."""
    qg, kg, vg = grouping(q), grouping(k), grouping(v)
    if not (regroup and _saves_grouped_copies(index, q, k, v)):
        return kernel(qg, kg, vg, **kwargs)
    with regroup_in_backward([(qg, q, grouping), (kg, k, grouping), (vg, v, grouping)]):
        return kernel(qg, kg, vg, **kwargs)


def sdpa_grouped(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: GroupIndex,
    scale: float | None = None,
    regroup: bool = True,
    tokens_per_call: int | None = None,
    heads_first: bool | None = None,
) -> torch.Tensor:
    """All groups of all branches through ``F.scaled_dot_product_attention``, in runs of groups.

    ``heads_first`` gathers each run as ``[groups, N, S, D]`` memory, one sample per call (the CPU
    kernel is fastest so); otherwise as ``[groups, S, N, D]``, which CUDA kernels read directly.
    None picks by device.
    """
    B, L, N, D = q.shape
    S = index.group_size
    if index.gather is None:
        # Groups are consecutive runs of tokens: zero-copy views, and the output is in token order.
        def view(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(B * index.num_groups, S, N, D).transpose(1, 2)

        out = F.scaled_dot_product_attention(view(q), view(k), view(v), scale=scale)
        return out.transpose(1, 2).reshape(B, L, N, D)

    recording = _records_autograd(q, k, v)
    if heads_first is None:
        # With autograd, one sample per call would cost a full-size gradient buffer per sample.
        heads_first = q.device.type == "cpu" and (B == 1 or not recording)
    groups = index.num_branches * index.num_groups
    budget = resolve_tokens_per_call(tokens_per_call, q.device, recording)
    result = q.new_zeros(B, L, N, D)
    for samples, run in _calls(B, groups, S, budget, one_sample=heads_first):
        slots = index.gather[run.start * S : run.stop * S]

        def grouped(x: torch.Tensor, samples: slice = samples, slots: torch.Tensor = slots) -> torch.Tensor:
            if heads_first:
                return (
                    _rows(x, samples).transpose(1, 2).index_select(2, slots).view(N, -1, S, D).transpose(0, 1)
                )
            return _rows(x, samples).index_select(1, slots).view(-1, S, N, D).transpose(1, 2)

        mask = None
        if index.key_valid is not None:
            n = samples.stop - samples.start
            mask = index.key_valid[run].view(1, -1, 1, 1, S).expand(n, -1, 1, 1, S).reshape(-1, 1, 1, S)
        out = _attend(
            F.scaled_dot_product_attention, grouped, q, k, v, index, regroup, attn_mask=mask, scale=scale
        )
        out = out.transpose(1, 2).reshape(samples.stop - samples.start, -1, N, D)
        valid = None if index.slot_valid is None else index.slot_valid[run]
        _add_to_tokens(result, samples, slots, out, index.num_branches, valid)
    return result


def flash_grouped(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: GroupIndex,
    scale: float | None = None,
    regroup: bool = True,
    tokens_per_call: int | None = None,
) -> torch.Tensor:
    """All groups of all branches through flash-attn (varlen when there is padding), in runs of groups."""
    functions = _flash_functions()
    if functions is None:
        raise RuntimeError("attention backend 'flash' cannot run: flash-attn is not installed")
    flash_attn_func, flash_attn_varlen_func = functions
    B, L, N, D = q.shape
    S = index.group_size
    if index.gather is None:
        # Groups are consecutive runs of tokens: zero-copy views, and the output is in token order.
        out = flash_attn_func(
            *(x.reshape(B * index.num_groups, S, N, D) for x in (q, k, v)), softmax_scale=scale
        )
        return out.reshape(B, L, N, D)

    budget = resolve_tokens_per_call(tokens_per_call, q.device, _records_autograd(q, k, v))
    if index.key_valid is None:
        # flash-attn's layout is ours, [batch, seqlen, heads, head_dim]: gather whole groups, no transpose.
        groups = index.num_branches * index.num_groups
        result = q.new_zeros(B, L, N, D)
        for samples, run in _calls(B, groups, S, budget, one_sample=False):
            slots = index.gather[run.start * S : run.stop * S]

            def grouped(
                x: torch.Tensor, samples: slice = samples, slots: torch.Tensor = slots
            ) -> torch.Tensor:
                return _rows(x, samples).index_select(1, slots).view(-1, S, N, D)

            out = _attend(flash_attn_func, grouped, q, k, v, index, regroup, softmax_scale=scale)
            _add_to_tokens(
                result,
                samples,
                slots,
                out.reshape(samples.stop - samples.start, -1, N, D),
                index.num_branches,
            )
        return result

    # Padding: pack only real tokens, one variable-length sequence per non-empty group and sample,
    # so padded slots cost nothing.
    offsets = index.packed_offsets
    result = q.new_zeros(B, L, N, D)
    for samples, run in _calls(B, len(offsets) - 1, S, budget, one_sample=False):
        first, last = offsets[run.start], offsets[run.stop]
        tokens = index.packed_gather[first:last]
        n = samples.stop - samples.start
        lengths = index.packed_cu_seqlens[run.start : run.stop + 1] - first
        per_sample = torch.arange(n, device=q.device, dtype=lengths.dtype).unsqueeze(1) * (last - first)
        cu = torch.cat(
            [(lengths[:-1].unsqueeze(0) + per_sample).flatten(), lengths.new_tensor([n * (last - first)])]
        )

        def packed(x: torch.Tensor, samples: slice = samples, tokens: torch.Tensor = tokens) -> torch.Tensor:
            return _rows(x, samples).index_select(1, tokens).reshape(-1, N, D)

        out = _attend(
            flash_attn_varlen_func,
            packed,
            q,
            k,
            v,
            index,
            regroup,
            cu_seqlens_q=cu,
            cu_seqlens_k=cu,
            max_seqlen_q=S,
            max_seqlen_k=S,
            softmax_scale=scale,
        )
        _add_to_tokens(result, samples, tokens, out.view(n, -1, N, D), index.num_branches)
    return result


KERNELS: dict[str, Callable[..., torch.Tensor]] = {"sdpa": sdpa_grouped, "flash": flash_grouped}

"""Exact multiply-accumulate (MAC) counts of T3 attention and of a whole Wan DiT forward.

One MAC is one multiply plus one add, i.e. 2 FLOPs (the convention of
``torch.utils.flop_counter.FlopCounterMode``, which reports ``2 * MACs``). Only matrix products are
counted (linear layers, the patch convolution, attention scores and the attention-weighted sum);
norms, activations, softmax, RoPE and modulation are elementwise and left out, as FlopCounterMode
leaves them out.

Counts are pure Python ints, computed from shapes alone, so they can be evaluated at 4K without
building a model. They count what this codebase runs: the T3 op computes every padded slot of every
group (padded keys are masked, not skipped), so `plan_attention_macs` includes the padding.

Layout legend as in `t3.attention.op`: ``L`` tokens, ``G`` groups per partition, ``S`` slots per
group (padding included), ``nb`` branches computed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from t3.attention.plan import Grid, WindowPlan, check_branches, check_grid, effective_branches
from t3.attention.schedule import Schedule

__all__ = [
    "MacBreakdown",
    "dense_attention_macs",
    "dit_macs",
    "plan_attention_macs",
    "schedule_attention_macs",
]


def dense_attention_macs(tokens: int, heads: int, head_dim: int, kv_tokens: int | None = None) -> int:
    """MACs of dense attention for one sample: ``Q K^T`` plus ``A V``.

    Args:
        tokens: query tokens ``L``.
        heads: attention heads ``N``.
        head_dim: channels per head ``D``.
        kv_tokens: key/value tokens (default ``tokens``, i.e. self-attention).

    Returns:
        ``2 * L * L_kv * N * D``.
    """
    kv_tokens = tokens if kv_tokens is None else kv_tokens
    return 2 * tokens * kv_tokens * heads * head_dim


def plan_attention_macs(
    grid: Grid, plan: WindowPlan, computed_branches: Iterable[str], heads: int, head_dim: int
) -> int:
    """MACs the T3 op runs for one layer and one sample, padded slots included.

    The op runs one attention over ``nb * G`` groups of ``S`` slots each, so this is
    ``nb * G * S^2 * 2 * N * D``.

    Args:
        grid: post-patch token grid ``(T, H, W)``.
        plan: the layer's window plan.
        computed_branches: the branches actually computed (after any sharing of identical ones).
        heads: attention heads ``N``.
        head_dim: channels per head ``D``.
    """
    grid = check_grid(grid)
    branches = check_branches(tuple(computed_branches))
    slots = plan.group_size(grid)  # checks that the plan fits the grid
    return len(branches) * plan.num_groups * slots * slots * 2 * heads * head_dim


def schedule_attention_macs(
    schedule: Schedule,
    grid: Grid,
    num_layers: int,
    heads: int,
    head_dim: int,
    *,
    share_identical: bool | None = None,
) -> int:
    """Self-attention MACs of all ``num_layers`` layers under ``schedule``, for one sample.

    Args:
        schedule: the T3 schedule.
        grid: post-patch token grid ``(T, H, W)``.
        num_layers: DiT blocks.
        heads: attention heads ``N``.
        head_dim: channels per head ``D``.
        share_identical: ``None`` follows the schedule's own ``share_identical_branches``; ``False``
            always computes every branch asked for (how the paper counts); ``True`` computes one
            branch where the local and dilated partitions coincide.
    """
    total = 0
    for lp in schedule.plans(grid, num_layers):
        if share_identical is None:
            computed = lp.computed
        else:
            computed = effective_branches(lp.plan, grid, lp.branches, share_identical)
        total += plan_attention_macs(grid, lp.plan, computed, heads, head_dim)
    return total


@dataclass(frozen=True)
class MacBreakdown:
    """MACs of one ``WanTransformer3DModel`` forward, by component, over all layers and the batch.

    Attributes:
        patch_embedding: the patchifying ``Conv3d``.
        time_embedding: the timestep MLP (``time_embedder.linear_1``, ``linear_2``).
        time_projection: ``time_proj`` to the six modulation vectors.
        text_embedding: the text MLP (``text_embedder.linear_1``, ``linear_2``).
        image_embedding: the image-embedding MLP (image-conditioned models only, else 0).
        self_attn_projections: ``to_q``, ``to_k``, ``to_v``, ``to_out`` of ``attn1``.
        self_attention: ``Q K^T`` and ``A V`` of ``attn1`` (dense or T3).
        cross_attn_projections: ``attn2``'s ``to_q`` and ``to_out`` on video tokens, ``to_k`` and
            ``to_v`` on text tokens, and ``add_k_proj``/``add_v_proj`` on image tokens if present.
        cross_attention: ``Q K^T`` and ``A V`` of ``attn2`` over text (and image) tokens.
        ffn: the two linears of the feed-forward network.
        output: ``proj_out``.
    """

    patch_embedding: int
    time_embedding: int
    time_projection: int
    text_embedding: int
    image_embedding: int
    self_attn_projections: int
    self_attention: int
    cross_attn_projections: int
    cross_attention: int
    ffn: int
    output: int

    @property
    def total(self) -> int:
        """All MACs of the forward."""
        return sum(getattr(self, f.name) for f in fields(self))

    @property
    def attention(self) -> int:
        """Self-attention scores and weighted sum only: the part T3 changes."""
        return self.self_attention

    def as_dict(self) -> dict[str, int]:
        """Every component plus ``total``, for tables and JSON."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["total"] = self.total
        return out


def _config_value(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def _as_config(config: Any) -> Any:
    """A config mapping from a mapping, a diffusers ``FrozenDict`` or a model with ``.config``."""
    if not isinstance(config, Mapping) and hasattr(config, "config"):
        return config.config
    return config


def _patch(config: Any) -> tuple[int, int, int]:
    patch = tuple(_config_value(_as_config(config), "patch_size"))
    if len(patch) != 3 or any(int(p) != p or p < 1 for p in patch):
        raise ValueError(f"patch size must be three positive ints (p_t, p_h, p_w), got {patch}")
    return (int(patch[0]), int(patch[1]), int(patch[2]))


def dit_macs(
    config: Any,
    grid: Grid,
    *,
    text_tokens: int = 512,
    batch: int = 1,
    schedule: Schedule | None = None,
    share_identical: bool | None = None,
    per_token_timestep: bool = False,
    image_tokens: int = 257,
) -> MacBreakdown:
    """MACs of one forward of a diffusers ``WanTransformer3DModel``, by component.

    Args:
        config: the model's config (a dict, a diffusers ``FrozenDict``, or the model itself).
        grid: post-patch token grid ``(T, H, W)``.
        text_tokens: text-encoder tokens (Wan pads prompts to 512).
        batch: samples in the batch.
        schedule: T3 schedule of the self-attention; ``None`` for dense attention (untransformed).
        share_identical: see `schedule_attention_macs` (ignored when ``schedule`` is None).
        per_token_timestep: timesteps of shape ``[B, L]`` (Wan2.2-TI2V), which run the time MLP and
            ``time_proj`` once per token instead of once per sample.
        image_tokens: image-encoder tokens, used only by image-conditioned models (``image_dim`` or
            ``added_kv_proj_dim`` set; 257 for Wan2.1-I2V's CLIP).

    Returns:
        A `MacBreakdown`; ``.total`` is half of what ``FlopCounterMode`` reports for the forward.
    """
    config = _as_config(config)
    grid = check_grid(grid)
    p = _patch(config)
    heads = int(_config_value(config, "num_attention_heads"))
    head_dim = int(_config_value(config, "attention_head_dim"))
    in_channels = int(_config_value(config, "in_channels"))
    out_channels = int(_config_value(config, "out_channels") or in_channels)
    text_dim = int(_config_value(config, "text_dim"))
    freq_dim = int(_config_value(config, "freq_dim"))
    ffn_dim = int(_config_value(config, "ffn_dim"))
    num_layers = int(_config_value(config, "num_layers"))
    image_dim = _config_value(config, "image_dim")
    added_kv_dim = _config_value(config, "added_kv_proj_dim")

    dim = heads * head_dim
    tokens = math.prod(grid)
    video = batch * tokens  # video token rows through every per-token linear
    text = batch * text_tokens
    time_rows = video if per_token_timestep else batch
    image = batch * image_tokens

    if schedule is None:
        self_attention = num_layers * dense_attention_macs(tokens, heads, head_dim)
    else:
        self_attention = schedule_attention_macs(
            schedule, grid, num_layers, heads, head_dim, share_identical=share_identical
        )

    cross_proj = 2 * video * dim * dim + 2 * text * dim * dim  # q, out on video; k, v on text
    cross_attention = dense_attention_macs(tokens, heads, head_dim, kv_tokens=text_tokens)
    if added_kv_dim is not None:
        # I2V: a second attention of the video queries over the image tokens, with its own k, v.
        cross_proj += 2 * image * int(added_kv_dim) * dim
        cross_attention += dense_attention_macs(tokens, heads, head_dim, kv_tokens=image_tokens)

    return MacBreakdown(
        patch_embedding=video * in_channels * math.prod(p) * dim,
        time_embedding=time_rows * (freq_dim * dim + dim * dim),
        time_projection=time_rows * dim * 6 * dim,
        text_embedding=text * (text_dim * dim + dim * dim),
        # WanImageEmbedding: FeedForward(image_dim, dim, mult=1) = Linear(image_dim, image_dim), Linear(image_dim, dim).
        image_embedding=0 if image_dim is None else image * int(image_dim) * (int(image_dim) + dim),
        self_attn_projections=num_layers * 4 * video * dim * dim,
        self_attention=batch * self_attention,
        cross_attn_projections=num_layers * cross_proj,
        cross_attention=num_layers * batch * cross_attention,
        ffn=num_layers * 2 * video * dim * ffn_dim,
        output=video * dim * out_channels * math.prod(p),
    )

"""The T3 transform: swap the self-attention processor of a diffusers Wan DiT for T3 attention.

`transform` and `untransform` are the package's public API, exported as ``t3.transform`` and
``t3.untransform``; the package attribute ``t3.transform`` is therefore the function, and the other
names of this module are imported from it by name (``from t3.transform import T3AttnProcessor``).

`transform(model, schedule)` sets a `T3AttnProcessor` on every ``blocks.{i}.attn1`` and registers a
forward pre-hook on the transformer that records the post-patch token grid ``(T, H, W)`` of each
input, because diffusers' Wan blocks never pass the grid down to their attention. Nothing else
changes: no parameter is added or renamed, so ``state_dict()`` is identical and the model still saves
and loads with diffusers. Cross-attention (``attn2``) is untouched. `untransform` restores the
original processors. The schedule goes into the model's config as its T3 record (`t3.models.record`):
a saved model carries it, and ``transform(model)`` without a schedule reads it back.

The grid is kept after the forward (not cleared in a post-hook) because gradient checkpointing
re-runs the blocks during backward and the processors read it again then.

Copies and compilation:

* The hook is an object (`RecordGrid`), not a closure, and it and the processors share their
  `GridState` only through attributes of the model, so ``copy.deepcopy(model)`` (teacher/student, EMA)
  gives the copy a hook and processors of its own that share a state of their own.
* Under ``torch.compile`` every layer's plan and index maps are constants of one graph per
  resolution: the hook runs outside the graph, and each processor gets its index maps from
  `layer_index`, which dynamo evaluates while tracing instead of tracing their (data-dependent)
  construction. Dynamo then guards on the grid, not on per-layer state, so a 30-layer model compiles
  once per resolution instead of once per distinct layer plan.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from t3.attention import Grid, GroupIndex, Schedule, get_schedule, group_index, grouped_attention

logger = logging.getLogger(__name__)


@dataclass
class GridState:
    """The token grid of the current forward, shared by the transformer's hook and its processors."""

    grid: Grid | None = None
    checked: set[Grid] = field(default_factory=set)


class RecordGrid:
    """The transformed model's forward pre-hook: record the token grid of each input in ``state``.

    A grid is checked against the schedule the first time it is seen, so a plan that does not fit
    fails before any attention runs, naming the layer. Excluded from ``torch.compile``: it runs on
    Python values only, and traced, its guards on ``state`` would recompile it at every new grid.
    """

    def __init__(self, schedule: Schedule, num_layers: int, state: GridState) -> None:
        self.schedule = schedule
        self.num_layers = num_layers
        self.state = state

    @torch.compiler.disable
    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden_states = args[0] if args else kwargs["hidden_states"]
        grid = token_grid(module, hidden_states.shape)
        if grid not in self.state.checked:
            self.schedule.plans(grid, self.num_layers)
            self.state.checked.add(grid)
            logger.debug("T3 %s", self.schedule.describe(grid))
        self.state.grid = grid


@torch.compiler.assume_constant_result
def layer_index(schedule: Schedule, layer: int, grid: Grid, device: torch.device) -> GroupIndex:
    """The index maps of ``layer`` on ``grid`` (cached by `t3.attention.group_index`).

    ``torch.compile`` calls this while tracing and keeps the result as a constant of the graph,
    guarded on the arguments.
    """
    layer_plan = schedule.layer_plan(layer, grid)
    return group_index(grid, layer_plan.plan, layer_plan.computed, device)


def apply_rotary_emb(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's RoPE on interleaved channel pairs, computed as diffusers' `WanAttnProcessor` does."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class T3AttnProcessor:
    """Self-attention processor for `WanAttention` that runs T3 attention over the token grid.

    Projections, q/k RMSNorm and RoPE are computed as in diffusers' `WanAttnProcessor` (diffusers
    0.42); only the dense attention call is replaced. Holds no parameters.
    """

    def __init__(
        self,
        layer: int,
        schedule: Schedule,
        state: GridState,
        backend: str = "auto",
        tokens_per_call: int | None = None,
    ) -> None:
        self.layer = layer
        self.schedule = schedule
        self.state = state
        self.backend = backend
        self.tokens_per_call = tokens_per_call

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(f"T3AttnProcessor (layer {self.layer}) is for self-attention without a mask")
        grid = self.state.grid
        if grid is None:
            raise RuntimeError(
                f"T3AttnProcessor (layer {self.layer}) has no token grid: call the transformer returned by "
                "t3.transform(...), whose pre-hook records it"
            )
        if attn.fused_projections:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))  # [B, L, N, D]
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = apply_rotary_emb(query, *rotary_emb)
            key = apply_rotary_emb(key, *rotary_emb)

        hidden_states = self.attend(query, key, value, grid)
        hidden_states = hidden_states.flatten(2, 3).type_as(query)  # [B, L, N*D]
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, grid: Grid) -> torch.Tensor:
        """This layer's T3 attention of ``[B, L, N, D]`` q, k, v over ``grid``.

        The one step that sequence parallelism replaces (`t3.parallel`: q, k, v then hold only this
        rank's shard of the tokens).
        """
        index = layer_index(self.schedule, self.layer, grid, query.device)
        return grouped_attention(query, key, value, index, self.backend, tokens_per_call=self.tokens_per_call)


@dataclass
class _Transformed:
    """What `transform` changed on a model, so that `untransform` can put it back."""

    schedule: Schedule
    state: GridState
    original_processors: dict[str, Any]
    hook: torch.utils.hooks.RemovableHandle


_ATTR = "_t3_transform"
# The record this process's `transform` wrote on the model (a loaded record is not in it).
_OWN_RECORD = "_t3_transform_record"


def _self_attention_layers(model: nn.Module) -> list[nn.Module]:
    blocks = getattr(model, "blocks", None)
    if blocks is None or not all(hasattr(b, "attn1") for b in blocks):
        raise TypeError(
            f"t3.transform expects a diffusers WanTransformer3DModel (blocks[i].attn1), got {type(model).__name__}"
        )
    return [b.attn1 for b in blocks]


def token_grid(model: nn.Module, latent_shape: torch.Size | tuple[int, ...]) -> Grid:
    """Post-patch token grid of a ``[B, C, F, H, W]`` latent for ``model``'s patch size."""
    p_t, p_h, p_w = model.config.patch_size
    _, _, f, h, w = latent_shape
    return (f // p_t, h // p_h, w // p_w)


def transform(
    model: nn.Module,
    schedule: Schedule | str | None = None,
    backend: str = "auto",
    tokens_per_call: int | None = None,
    *,
    allow_schedule_change: bool = False,
) -> nn.Module:
    """Swap every self-attention of ``model`` for T3 attention with ``schedule`` (in place).

    The schedule is recorded in the model's config (`t3.models.record`), so the model saved with
    diffusers' ``save_pretrained`` (or `t3.models.save_dit`) says which schedule it runs. A record the
    model was loaded with is binding (another schedule needs ``allow_schedule_change``); one an earlier
    `transform` of the same object wrote is not.

    Args:
        model: a diffusers ``WanTransformer3DModel``.
        schedule: a `Schedule` or the name of a preset (``dense``, ``wan21_4k``, ...); None: the schedule
            of the T3 record the model carries (a model saved after `transform`, or a t3 export).
        backend: attention backend for the op (``auto``, ``sdpa``, ``flash``).
        tokens_per_call: bound on the gathered slots per attention call (bounds the transient memory
            of the grouped q, k, v at 4K); None: automatic (see `t3.attention.t3_attention`).
        allow_schedule_change: run ``schedule`` even where the model's record names another one.

    Returns:
        The same model, now running T3 attention at any input resolution.

    Raises:
        t3.models.record.ScheduleConflictError: ``schedule`` differs from the recorded one and
            ``allow_schedule_change`` is False.
    """
    from t3.attention.backends import resolve_tokens_per_call
    from t3.models.record import RECORD_KEY, T3Record, choose_schedule

    resolve_tokens_per_call(tokens_per_call, torch.device("cpu"))  # a bad value fails here, not mid-forward
    if isinstance(schedule, str):
        schedule = get_schedule(schedule)
    layers = _self_attention_layers(model)
    record = T3Record.from_config(model.config, source="the model's T3 record")
    if record is not None and getattr(model, _OWN_RECORD, None) == model.config.get(RECORD_KEY):
        # Written by an earlier transform of this same object, not loaded with the weights: choosing
        # another schedule in the same session overrides nothing the weights were trained with.
        record = None
    chosen = choose_schedule(record, schedule, allow_change=allow_schedule_change, source="this model")
    if chosen is None:
        raise ValueError(
            "t3.transform: no schedule given and the model carries no T3 record; pass one "
            "(e.g. 'wan21_windows', or 'dense' for full attention)"
        )
    schedule = chosen
    if record is None or not record.schedule.same_attention(schedule):
        from t3.models.dit import match_preset

        new = T3Record(schedule=schedule, model_preset=match_preset(model.config)).as_dict()
        model.register_to_config(**{RECORD_KEY: new})
        object.__setattr__(model, _OWN_RECORD, new)
    if getattr(model, _ATTR, None) is not None:
        untransform(model)
    state = GridState()
    original = {}
    for i, attn in enumerate(layers):
        original[i] = attn.processor
        attn.set_processor(T3AttnProcessor(i, schedule, state, backend, tokens_per_call))

    hook = model.register_forward_pre_hook(RecordGrid(schedule, len(layers), state), with_kwargs=True)
    object.__setattr__(model, _ATTR, _Transformed(schedule, state, original, hook))
    return model


def untransform(model: nn.Module) -> nn.Module:
    """Restore the processors ``model`` had before `transform` (in place)."""
    transformed: _Transformed | None = getattr(model, _ATTR, None)
    if transformed is None:
        raise ValueError("untransform: this model was not transformed with t3.transform")
    for i, attn in enumerate(_self_attention_layers(model)):
        attn.set_processor(transformed.original_processors[i])
    transformed.hook.remove()
    object.__setattr__(model, _ATTR, None)
    return model


def schedule_of(model: nn.Module) -> Schedule | None:
    """The schedule a transformed model runs, or None for an untransformed one."""
    transformed: _Transformed | None = getattr(model, _ATTR, None)
    return None if transformed is None else transformed.schedule

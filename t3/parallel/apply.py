"""Apply sequence parallelism to a T3-transformed diffusers ``WanTransformer3DModel``, from outside.

`apply_sequence_parallel(model, group)` leaves the model's code and weights alone and adds:

- a forward pre-hook on the transformer: it computes the token grid and its `ShardLayout`, and cuts a
  per-token timestep ``[B, L]`` (Wan2.2-TI2V) to this rank's tokens, so the time embedding, the block
  modulation and the output modulation all see local tokens;
- a forward hook on ``rope``: each rank keeps the rotary table rows of its own tokens, i.e. every token
  keeps its global ``(t, h, w)`` position;
- a forward pre-hook on ``blocks[0]``: the patchified tokens ``[B, L, C]`` are cut to this rank's shard
  ``[B, P, C]``; norms, projections, cross-attention and the FFN of every block then run on the shard;
- a forward hook on ``proj_out``: the shards are gathered (`t3.parallel.comm.gather_tokens`), so
  unpatchify and the model's output are the full sample on every rank;
- a `SequenceParallelAttnProcessor` in place of each ``T3AttnProcessor``: the same projections,
  norms and RoPE, with `t3.parallel.attention.sequence_parallel_attention` as the attention step.

The model must be transformed first: ``t3.transform(model, "dense")`` for full attention (identical to
the untransformed model). `remove_sequence_parallel` undoes everything. Gradient checkpointing works
(hooks run again in the recomputation), as do DDP, DeepSpeed ZeRO and FSDP2, which see the same
parameters; `t3.parallel.loss` gives the loss scale.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from t3.attention import Grid
from t3.parallel.assignment import DEFAULT_MAX_IMBALANCE, POLICIES
from t3.parallel.attention import sequence_parallel_attention
from t3.parallel.comm import ProcessGroup, gather_tokens
from t3.parallel.layout import ALIGNS, ShardLayout, shard_layout
from t3.transform import T3AttnProcessor, schedule_of, token_grid

logger = logging.getLogger(__name__)

_ATTR = "_t3_sequence_parallel"


@dataclass
class SequenceParallelState:
    """The SP settings of a model and the layout of its current input, shared by hooks and processors."""

    group: ProcessGroup
    sp: int
    rank: int
    align: str
    policy: str
    max_imbalance: float
    layout: ShardLayout | None = None
    hooks: list[torch.utils.hooks.RemovableHandle] = field(default_factory=list)
    original_processors: dict[int, T3AttnProcessor] = field(default_factory=dict)

    def current_layout(self) -> ShardLayout:
        if self.layout is None:
            raise RuntimeError("sequence parallelism: no input seen yet (call the transformer itself)")
        return self.layout


class SequenceParallelAttnProcessor(T3AttnProcessor):
    """`T3AttnProcessor` whose attention runs on this rank's token shard with the SP exchange."""

    def __init__(self, base: T3AttnProcessor, sp: SequenceParallelState) -> None:
        super().__init__(base.layer, base.schedule, base.state, base.backend, base.tokens_per_call)
        self.sp = sp

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, grid: Grid) -> torch.Tensor:
        layer_plan = self.schedule.layer_plan(self.layer, grid)
        return sequence_parallel_attention(
            query, key, value, grid, layer_plan.plan, layer_plan.branches, self.backend,
            layout=self.sp.current_layout(), group=self.sp.group,
            share_identical=self.schedule.share_identical_branches, tokens_per_call=self.tokens_per_call,
            policy=self.sp.policy, max_imbalance=self.sp.max_imbalance, layer=self.layer,
        )  # fmt: skip


def _replace_arg(args: tuple, kwargs: dict, position: int, name: str, value: Any) -> tuple[tuple, dict]:
    if name in kwargs:
        return args, {**kwargs, name: value}
    return (*args[:position], value, *args[position + 1 :]), kwargs


def _get_arg(args: tuple, kwargs: dict, position: int, name: str) -> Any:
    return kwargs[name] if name in kwargs else args[position]


def apply_sequence_parallel(
    model: nn.Module,
    group: ProcessGroup | None,
    *,
    align: str = "tokens",
    policy: str = "auto",
    max_imbalance: float = DEFAULT_MAX_IMBALANCE,
) -> nn.Module:
    """Run ``model`` sequence-parallel over the ranks of ``group`` (in place).

    Every rank of ``group`` must call the model together with the same inputs (the same latents,
    timesteps and text embeddings); each computes on its shard of the video tokens and all return the
    full output.

    Args:
        model: a diffusers ``WanTransformer3DModel`` transformed by `t3.transform`.
        group: the SP process group (`ParallelGroups.sp_group`); None: no sequence parallelism, the model
            is left as it is.
        align: ``"tokens"`` (even shards) or ``"frames"`` (shards on frame boundaries); see
            `t3.parallel.layout`.
        policy, max_imbalance: the per-layer work assignment (`t3.parallel.assignment.assign_layer`).

    Returns:
        The same model.
    """
    if align not in ALIGNS:
        raise ValueError(f"sequence-parallel align must be one of {ALIGNS}, got {align!r}")
    if policy not in POLICIES:
        raise ValueError(f"sequence-parallel policy must be one of {POLICIES}, got {policy!r}")
    schedule = schedule_of(model)
    if schedule is None:
        raise TypeError(
            "apply_sequence_parallel needs a model transformed by t3.transform "
            "(for full attention: t3.transform(model, 'dense'))"
        )
    if getattr(model, _ATTR, None) is not None:
        remove_sequence_parallel(model)
    if group is None:
        return model
    sp, rank = dist.get_world_size(group), dist.get_rank(group)
    state = SequenceParallelState(group, sp, rank, align, policy, float(max_imbalance))

    for block in model.blocks:
        base = block.attn1.processor
        state.original_processors[base.layer] = base
        block.attn1.set_processor(SequenceParallelAttnProcessor(base, state))

    def before_model(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if not all(isinstance(b.attn1.processor, SequenceParallelAttnProcessor) for b in module.blocks):
            raise RuntimeError(
                "the attention processors changed after apply_sequence_parallel (t3.transform or "
                "untransform was called): call remove_sequence_parallel first, then apply it again"
            )
        hidden_states = _get_arg(args, kwargs, 0, "hidden_states")
        state.layout = shard_layout(token_grid(module, hidden_states.shape), sp, align)
        timestep = _get_arg(args, kwargs, 1, "timestep")
        if timestep.dim() == 2:  # one timestep per token: keep this rank's
            args, kwargs = _replace_arg(args, kwargs, 1, "timestep", state.layout.shard(timestep, rank))
        return args, kwargs

    def shard_rope(
        module: nn.Module, args: tuple, output: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, ...]:
        return tuple(state.current_layout().shard(freqs, rank) for freqs in output)

    def shard_tokens(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        hidden_states = _get_arg(args, kwargs, 0, "hidden_states")
        return _replace_arg(
            args, kwargs, 0, "hidden_states", state.current_layout().shard(hidden_states, rank)
        )

    def gather_output(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return gather_tokens(output, state.current_layout(), group)

    state.hooks = [
        model.register_forward_pre_hook(before_model, with_kwargs=True),
        model.rope.register_forward_hook(shard_rope),
        model.blocks[0].register_forward_pre_hook(shard_tokens, with_kwargs=True),
        model.proj_out.register_forward_hook(gather_output),
    ]
    object.__setattr__(model, _ATTR, state)
    logger.info("sequence parallelism: %d ranks, shards cut by %s, rank %d", sp, align, rank)
    return model


def remove_sequence_parallel(model: nn.Module) -> nn.Module:
    """Undo `apply_sequence_parallel` (in place); a model without it is returned unchanged."""
    state: SequenceParallelState | None = getattr(model, _ATTR, None)
    if state is None:
        return model
    for handle in state.hooks:
        handle.remove()
    for block in model.blocks:
        processor = block.attn1.processor
        if isinstance(processor, SequenceParallelAttnProcessor):
            block.attn1.set_processor(state.original_processors[processor.layer])
    object.__setattr__(model, _ATTR, None)
    return model


def sequence_parallel_state(model: nn.Module) -> SequenceParallelState | None:
    """The SP state of a model (None when `apply_sequence_parallel` is not in effect)."""
    return getattr(model, _ATTR, None)

"""Sequence parallelism (SP): one video's tokens sharded over the ranks of an SP group, T3-aware.

Applied from outside the model (the model code stays single-device), one idea per module:

- `layout`: which contiguous token range each rank holds (`shard_layout`, `check_sequence_parallel`);
- `assignment`: which rank computes which (branch, group, head) attention units of a layer, balanced,
  moving as few q/k/v rows as possible (`assign_layer`, `layer_candidates`);
- `exchange`: per rank and layer, the index maps and split sizes of the exchange (`exchange_plan`);
- `comm`: autograd-aware all-to-all of rows and gathering of shards;
- `attention`: T3 attention on token shards (`sequence_parallel_attention`);
- `apply`: hooks and processors that run a transformed Wan DiT under SP (`apply_sequence_parallel`);
- `groups`: SP and data-parallel process groups (`build_parallel_groups`) and the sample stream each
  rank reads (`data_parallel_rank`);
- `loss`: the loss scale that makes the engine's gradient averaging exact (`loss_scale`);
- `cost`: bytes exchanged (T3-aware and Ulysses) and per-rank attention MACs of a schedule;
- `settings`: the ``parallel.*`` config values checked before anything is built (`check_parallel_settings`);
- `torchrun`: the default process group of a ``torchrun`` launch for generation (`distributed_from_env`).
"""

from t3.parallel.apply import (
    SequenceParallelAttnProcessor,
    apply_sequence_parallel,
    remove_sequence_parallel,
    sequence_parallel_state,
)
from t3.parallel.assignment import DEFAULT_MAX_IMBALANCE, LayerAssignment, assign_layer, layer_candidates
from t3.parallel.attention import sequence_parallel_attention
from t3.parallel.exchange import ExchangePlan, exchange_plan
from t3.parallel.groups import (
    ParallelGroups,
    build_parallel_groups,
    check_world,
    data_parallel_rank,
    group_ranks,
)
from t3.parallel.layout import LayoutError, ShardLayout, check_sequence_parallel, shard_layout
from t3.parallel.loss import loss_scale
from t3.parallel.settings import ParallelSettingsError, check_parallel_settings

__all__ = [
    "DEFAULT_MAX_IMBALANCE",
    "ExchangePlan",
    "LayerAssignment",
    "LayoutError",
    "ParallelGroups",
    "ParallelSettingsError",
    "SequenceParallelAttnProcessor",
    "ShardLayout",
    "apply_sequence_parallel",
    "assign_layer",
    "build_parallel_groups",
    "check_parallel_settings",
    "check_sequence_parallel",
    "check_world",
    "data_parallel_rank",
    "exchange_plan",
    "group_ranks",
    "layer_candidates",
    "loss_scale",
    "remove_sequence_parallel",
    "sequence_parallel_attention",
    "sequence_parallel_state",
    "shard_layout",
]

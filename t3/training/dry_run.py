"""Dry run: build a run on the meta device and answer "does it fit, on how many GPUs, how fast".

``python train.py experiment=t3_4k dry_run=true`` validates the config, builds the DiT on
``torch.device("meta")``, applies the T3 swap and the trainable-parameter selection, constructs the
strategy and the optimizer, and logs:

* tokens per sample and the per-layer T3 plans (`Schedule.describe`);
* multiply-accumulates of one forward per sample, dense vs T3 (`t3.attention.flops.dit_macs`);
* model state and activation memory per GPU for the strategy and GPU count (``dry_run_num_gpus``;
  formulas in `t3.memory`), and the verdict against a GPU of ``dry_run_gpu_memory_gib``: the margin,
  or how far over; the fewest GPUs that fit (world sizes ``parallel.sequence_parallel_size`` x a
  data-parallel size), or, when activations alone are too large (more data-parallel GPUs do not shrink
  them), the smallest sequence-parallel size that fits; the host memory per node that offloading needs
  (pinned, for activation offload);
* with ``parallel.sequence_parallel_size`` > 1: each GPU's token shard, the SP attention buffers in its
  activations, and the bytes each GPU sends per training step (the T3-aware exchange of every layer in
  forward, backward and recompute, the output gather; Ulysses' all-to-all as the yardstick;
  `t3.parallel.cost`);
* the step time and tokens/s implied by ``dry_run_tflops`` sustained per GPU (`throughput`).

Throughput: a forward costs ``2 * MACs`` FLOPs; backward two forwards for attention's weight-free
products and for linear layers whose weights train (input and weight gradients), one forward for
frozen ones (input gradient only), so LoRA and attention-only runs cost less than a full fine-tune;
checkpointing adds one forward (`training_macs_per_sample`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from t3.attention.flops import MacBreakdown, dit_macs
from t3.config import FinetuneConfig, ModelConfig, RunFacts, StrategyConfig
from t3.memory import GIB, MemoryEstimate, activation_memory, state_memory
from t3.parallel.cost import (
    LayerCost,
    StepCommunication,
    peak_attention_bytes,
    schedule_costs,
    step_communication,
)
from t3.parallel.layout import SP_KEY, LayoutError, check_sequence_parallel
from t3.training.finetune import build_dit, prepare_for_finetuning

__all__ = [
    "DryRun",
    "Verdict",
    "build_dry_run",
    "dry_run",
    "format_dry_run",
    "throughput",
    "training_macs_per_sample",
]

logger = logging.getLogger(__name__)

#: GPUs per node assumed for host memory per node when ``trainer.devices`` is ``auto``.
GPUS_PER_NODE = 8

#: Largest sequence-parallel size the verdict suggests when no GPU count fits (two 8-GPU nodes).
MAX_SUGGESTED_SP = 16


def training_macs_per_sample(
    macs: MacBreakdown, *, trainable: str, adapter_macs: int = 0, checkpointing: bool
) -> int:
    """MACs of one training sample: forward, backward and, with checkpointing, the recompute.

    Backward costs two forwards for attention's weight-free products (``q k^T`` and the value
    product) and for a linear layer whose weight trains (input and weight gradients), one forward for
    a frozen linear layer (input gradient only). ``trainable``: ``all`` trains every base linear,
    ``attention`` the self-attention projections, ``lora`` none of them: its adapters train instead
    (``adapter_macs``: their forward MACs). Frozen embeddings are counted with an input gradient they
    do not need, a small overestimate.
    """
    weightless = macs.self_attention + macs.cross_attention
    linear = macs.total - weightless
    trained_linear = {"all": linear, "attention": macs.self_attn_projections, "lora": 0}[trainable]
    forward = macs.total + adapter_macs
    backward = 2 * weightless + linear + trained_linear + 2 * adapter_macs
    return forward + backward + (forward if checkpointing else 0)


def _adapter_macs(dit: torch.nn.Module, *, video_tokens: int, text_tokens: int) -> int:
    """Forward MACs per sample of the LoRA adapters: each adapter weight multiplies once per row it
    sees (the text tokens for cross-attention keys and values, the video tokens everywhere else)."""
    total = 0
    for name, param in dit.named_parameters():
        if param.requires_grad and ".lora_" in name:
            text = ".attn2.to_k." in name or ".attn2.to_v." in name
            total += (text_tokens if text else video_tokens) * param.numel()
    return total


def throughput(
    train_macs_per_sample: int, *, tokens: int, tflops: float, num_gpus: int, global_batch: int
) -> dict[str, float]:
    """Step time and token rates implied by ``tflops`` sustained TFLOP/s per GPU.

    Args:
        train_macs_per_sample: MACs of one training sample (`training_macs_per_sample`).
    """
    flops_per_sample = 2 * train_macs_per_sample
    step_time = global_batch * flops_per_sample / (num_gpus * tflops * 1e12)
    return {
        "flops_per_sample": float(flops_per_sample),
        "step_time_s": step_time,
        "tokens_per_s": global_batch * tokens / step_time,
        "tokens_per_s_per_gpu": global_batch * tokens / step_time / num_gpus,
    }


@dataclass(frozen=True)
class Verdict:
    """The memory estimate against one GPU's memory, and what follows for the GPU count and the hosts.

    Attributes:
        gpu_bytes: The GPU memory checked against (``dry_run_gpu_memory_gib``).
        margin: ``gpu_bytes`` minus the estimate per GPU (negative: over).
        fewest_gpus: The smallest world size whose estimate fits, or None when none does: the SP size
            times a data-parallel size that divides the global batch into micro-batches.
        gpus_per_node: GPUs per node (``trainer.devices``; `GPUS_PER_NODE` for ``auto``).
        host_per_node: Host memory per node for offloaded model state and activations.
        pinned_per_node: Of ``host_per_node``, the pinned activation-offload buffers.
        suggested_sp: When no GPU count fits, the smallest larger sequence-parallel size (up to
            `MAX_SUGGESTED_SP`) with which one does, else None.
        suggested_gpus: The fewest GPUs that fit with ``suggested_sp``.
        suggested_activations: Activation bytes per GPU with ``suggested_sp``.
    """

    gpu_bytes: float
    margin: float
    fewest_gpus: int | None
    gpus_per_node: int
    host_per_node: float
    pinned_per_node: float
    suggested_sp: int | None = None
    suggested_gpus: int | None = None
    suggested_activations: float = 0.0

    @property
    def fits(self) -> bool:
        return self.margin >= 0


def _verdict(
    cfg: DictConfig,
    facts: RunFacts,
    memory: MemoryEstimate,
    state_at: Callable[[int], tuple[float, ...]],
    activations_at: Callable[[int], float],
) -> Verdict:
    """``state_at(world)``: model state bytes per GPU; ``activations_at(sp)``: activation bytes per GPU."""
    budget = cfg.dry_run_gpu_memory_gib * GIB
    per_step = cfg.batch.global_size // cfg.batch.micro_size
    replicas = [d for d in range(1, per_step + 1) if per_step % d == 0]

    def fewest_at(sp: int, activations: float) -> int | None:
        worlds = [1] if cfg.strategy.name == "auto" else [sp * d for d in replicas]
        return next((n for n in worlds if sum(state_at(n)) + activations <= budget), None)

    sp = facts.sequence_parallel_size
    fewest = fewest_at(sp, memory.activations)
    suggested: tuple[int | None, int | None, float] = (None, None, 0.0)
    if fewest is None and cfg.strategy.name != "auto":
        for larger in range(sp + 1, MAX_SUGGESTED_SP + 1):
            try:
                check_sequence_parallel(facts.grid, larger, cfg.parallel.align)
            except LayoutError:
                break  # larger sizes cannot shard the grid either
            activations = activations_at(larger)
            gpus = fewest_at(larger, activations)
            if gpus is not None:
                suggested = (larger, gpus, activations)
                break
    devices = cfg.trainer.devices
    per_node = devices if isinstance(devices, int) and devices > 0 else GPUS_PER_NODE
    on_node = min(facts.world_size, per_node)
    return Verdict(
        gpu_bytes=budget,
        margin=budget - memory.gpu_total,
        fewest_gpus=fewest,
        gpus_per_node=per_node,
        host_per_node=on_node * memory.host_total,
        pinned_per_node=on_node * memory.activations_cpu,
        suggested_sp=suggested[0],
        suggested_gpus=suggested[1],
        suggested_activations=suggested[2],
    )


@dataclass(frozen=True)
class SequenceParallelCost:
    """What sequence parallelism costs one GPU of the run (`t3.parallel.cost`).

    Attributes:
        costs: Every layer's `LayerCost` (assignment, bytes, MACs per rank).
        attention_bytes: Per sample, the most one layer's SP attention holds on one GPU.
        communication: Bytes one GPU sends per training step.
    """

    costs: list[LayerCost]
    attention_bytes: float
    communication: StepCommunication

    @property
    def shard_tokens(self) -> int:
        return self.costs[0].assignment.layout.shard_size

    @property
    def attention_imbalance(self) -> float:
        """Per-rank attention MACs of the step, largest over mean, minus one."""
        largest = sum(max(c.macs_per_rank) for c in self.costs)
        mean = sum(sum(c.macs_per_rank) for c in self.costs) / len(self.costs[0].macs_per_rank)
        return largest / mean - 1.0 if mean else 0.0


def _sequence_parallel_cost(
    cfg: DictConfig, facts: RunFacts, sp: int, *, bytes_per_value: int, checkpointing: bool
) -> SequenceParallelCost:
    from t3.models import get_spec

    config = get_spec(facts.preset).dit_config
    costs = schedule_costs(
        facts.schedule,
        facts.grid,
        facts.num_layers,
        int(config["num_attention_heads"]),
        int(config["attention_head_dim"]),
        sp,
        align=cfg.parallel.align,
        policy=cfg.parallel.policy,
        max_imbalance=cfg.parallel.max_imbalance,
    )
    communication = step_communication(
        costs,
        out_width=int(config["out_channels"]) * math.prod(config["patch_size"]),
        bytes_per_value=bytes_per_value,
        micro_batch=cfg.batch.micro_size,
        accumulate=max(facts.accumulate, 1),
        checkpointing=checkpointing,
    )
    return SequenceParallelCost(costs, peak_attention_bytes(costs, bytes_per_value), communication)


@dataclass
class DryRun:
    """A run built on the meta device, with its cost model."""

    facts: RunFacts
    dit: torch.nn.Module
    num_params: int
    num_trainable: int
    macs_dense: MacBreakdown
    macs_t3: MacBreakdown
    memory: MemoryEstimate
    verdict: Verdict
    speed_dense: dict[str, float]
    speed_t3: dict[str, float]
    strategy: Any
    optimizer: torch.optim.Optimizer
    describe: str
    sequence_parallel: SequenceParallelCost | None = None


def build_dry_run(cfg: DictConfig, facts: RunFacts) -> DryRun:
    """Build the DiT, T3 swap, trainable selection, strategy and optimizer on the meta device; cost them.

    Args:
        cfg: A validated training config.
        facts: What `t3.config.validate` derived from it.
    """
    from t3.models import get_spec
    from t3.training.optim import build_optimizer
    from t3.training.strategies import build_strategy

    # Only the architecture is needed: weight paths may still be ??? in a dry run.
    model_cfg = ModelConfig(
        preset=cfg.model.preset,
        attention_backend=cfg.model.attention_backend,
        attention_tokens_per_call=cfg.model.attention_tokens_per_call,
    )
    finetune: FinetuneConfig = OmegaConf.to_object(cfg.finetune)  # type: ignore[assignment]
    strategy_cfg: StrategyConfig = OmegaConf.to_object(cfg.strategy)  # type: ignore[assignment]
    spec = get_spec(facts.preset)

    dit = build_dit(model_cfg, device="meta")
    summary = prepare_for_finetuning(dit, facts.schedule, model_cfg, finetune)
    optimizer = build_optimizer(dit.parameters(), OmegaConf.to_object(cfg.optim))  # type: ignore[arg-type]
    strategy = build_strategy(
        strategy_cfg,
        accelerator=cfg.trainer.accelerator,
        world_size=facts.world_size,
        micro_batch_size=cfg.batch.micro_size,
    )

    config = spec.dit_config
    macs_dense = dit_macs(config, facts.grid)
    macs_t3 = dit_macs(config, facts.grid, schedule=facts.schedule)
    tokens = math.prod(facts.grid)
    bf16 = "bf16" in cfg.trainer.precision

    def state_at(world_size: int) -> tuple[float, float, float, float]:
        return state_memory(
            num_params=summary.total,
            num_trainable=summary.trainable,
            strategy=strategy_cfg,
            world_size=world_size,
            bf16=bf16,
        )

    weights, grads, opt_state, cpu = state_at(facts.world_size)
    branches = max(len(lp.computed) for lp in facts.schedule.plans(facts.grid, facts.num_layers))
    bytes_per_value = 2 if bf16 else 4

    def sp_cost(sp: int) -> SequenceParallelCost | None:
        if sp == 1:
            return None
        return _sequence_parallel_cost(
            cfg, facts, sp, bytes_per_value=bytes_per_value, checkpointing=finetune.gradient_checkpointing
        )

    def activations(sp_cost: SequenceParallelCost | None) -> tuple[float, float]:
        return activation_memory(
            tokens=tokens if sp_cost is None else sp_cost.shard_tokens,
            dim=spec.dim,
            ffn_dim=int(config["ffn_dim"]),
            num_layers=facts.num_layers,
            micro_batch=cfg.batch.micro_size,
            bytes_per_value=bytes_per_value,
            branches=branches,
            checkpointing=finetune.gradient_checkpointing,
            offload=finetune.offload_activations,
            attention_bytes=None if sp_cost is None else sp_cost.attention_bytes,
        )

    sequence_parallel = sp_cost(facts.sequence_parallel_size)
    act_gpu, act_cpu = activations(sequence_parallel)
    memory = MemoryEstimate(weights, grads, opt_state, cpu, act_gpu, act_cpu)
    adapters = _adapter_macs(dit, video_tokens=tokens, text_tokens=spec.text_len)
    speed = {
        name: throughput(
            training_macs_per_sample(
                macs,
                trainable=finetune.trainable,
                adapter_macs=adapters,
                checkpointing=finetune.gradient_checkpointing,
            ),
            tokens=tokens,
            tflops=cfg.dry_run_tflops,
            num_gpus=facts.world_size,
            global_batch=cfg.batch.global_size,
        )
        for name, macs in (("dense", macs_dense), ("t3", macs_t3))
    }
    return DryRun(
        facts=facts,
        dit=dit,
        num_params=summary.total,
        num_trainable=summary.trainable,
        macs_dense=macs_dense,
        macs_t3=macs_t3,
        memory=memory,
        verdict=_verdict(cfg, facts, memory, state_at, lambda sp: activations(sp_cost(sp))[0]),
        speed_dense=speed["dense"],
        speed_t3=speed["t3"],
        strategy=strategy,
        optimizer=optimizer,
        describe=facts.schedule.describe(facts.grid, facts.schedule.period),
        sequence_parallel=sequence_parallel,
    )


def _strategy_name(cfg: DictConfig) -> str:
    s = cfg.strategy
    if s.name != "deepspeed":
        return s.name
    extra = "".join(
        f" + {what} offload"
        for what, on in (("optimizer", s.offload_optimizer), ("parameter", s.offload_parameters))
        if on
    )
    return f"DeepSpeed ZeRO-{s.zero_stage}{extra}"


def _verdict_lines(cfg: DictConfig, run: DryRun) -> list[str]:
    """Does it fit, on how many GPUs, and what the hosts need."""
    v, m, world = run.verdict, run.memory, run.facts.world_size
    gpu = f"{v.gpu_bytes / GIB:g} GiB per GPU (dry_run_gpu_memory_gib)"
    if v.fits:
        lines = [
            f"verdict: fits in {gpu} with {v.margin / GIB:.2f} GiB to spare ({v.margin / v.gpu_bytes:.0%})"
        ]
    else:
        lines = [f"verdict: does NOT fit in {gpu}: {-v.margin / GIB:.2f} GiB over"]
    sp = run.facts.sequence_parallel_size
    if v.fewest_gpus is not None:
        worlds = (
            "world sizes that divide batch.global_size / batch.micro_size"
            if sp == 1
            else f"world sizes {SP_KEY}={sp} x a divisor of batch.global_size / batch.micro_size"
        )
        lines.append(
            f"  fewest GPUs that fit: {v.fewest_gpus} ({worlds}; check another with dry_run_num_gpus=N)"
        )
    else:
        ft = cfg.finetune
        suggestion = (
            [
                f"{SP_KEY}={v.suggested_sp} ({v.suggested_activations / GIB:.2f} GiB of activations per GPU; "
                f"fits on {v.suggested_gpus} GPUs)"
            ]
            if v.suggested_sp
            else []
        )
        remedies = suggestion + [
            key
            for key, applies in (
                ("finetune.gradient_checkpointing=true", not ft.gradient_checkpointing),
                (
                    "finetune.offload_activations=true",
                    ft.gradient_checkpointing and not ft.offload_activations,
                ),
                ("a smaller batch.micro_size", cfg.batch.micro_size > 1),
            )
            if applies
        ] or ["a smaller data.height/width/num_frames, or GPUs with more memory"]
        lines.append(
            f"  no GPU count fits at {SP_KEY}={sp}: activations alone are {m.activations / GIB:.2f} GiB per GPU; "
            "try " + ", or ".join(remedies)
        )
    if m.host_total:
        parts = (
            [f"{v.pinned_per_node / GIB:.2f} GiB pinned for activation offload"] if v.pinned_per_node else []
        )
        if v.host_per_node > v.pinned_per_node:
            parts.append(f"{(v.host_per_node - v.pinned_per_node) / GIB:.2f} GiB for DeepSpeed offload")
        lines.append(f"  host memory per node ({min(world, v.gpus_per_node)} GPUs): " + " + ".join(parts))
    if sp == 1 and (world > 1 and m.activations >= m.state or not v.fits):
        lines.append(
            f"  note: activations ({m.activations / GIB:.2f} GiB per GPU) do not shrink with more data-parallel "
            f"GPUs: every GPU holds whole samples; {SP_KEY}=N splits each sample's tokens over N GPUs"
        )
    return lines


def _sequence_parallel_lines(cfg: DictConfig, run: DryRun) -> list[str]:
    """Communication per training step and GPU under sequence parallelism."""
    spc = run.sequence_parallel
    if spc is None:
        return []
    c, sp = spc.communication, run.facts.sequence_parallel_size
    heads = spc.costs[0].assignment.heads
    ulysses = "" if heads % sp == 0 else f"; Ulysses itself needs the {heads} heads divisible by {sp}"
    passes = "forward, recompute, backward" if c.passes == 3 else "forward, backward"
    return [
        f"communication per training step per GPU ({SP_KEY}={sp}, {c.passes} exchanges per layer: {passes}; "
        f"micro-batch {cfg.batch.micro_size} x accumulate {c.micro_batches}; t3/parallel/cost.py):",
        f"  T3-aware q/k/v exchange {c.exchange / 1e9:9.1f} GB (largest rank; Ulysses all-to-all by heads: "
        f"{c.ulysses / 1e9:.1f} GB{ulysses})",
        f"  output gather           {c.gather / 1e9:9.1f} GB",
        f"  total                   {c.total / 1e9:9.1f} GB sent per GPU per step ({c.total / c.micro_batches / 1e9:.1f} GB "
        f"per micro-batch); attention work of the largest rank {spc.attention_imbalance:.1%} over the mean",
    ]


def _batch_line(cfg: DictConfig, f: RunFacts) -> str:
    head = f"batch: global {cfg.batch.global_size} = micro {cfg.batch.micro_size}"
    if f.sequence_parallel_size == 1:
        return f"{head} x {f.world_size} GPUs x accumulate {f.accumulate}"
    return (
        f"{head} x data-parallel {f.data_parallel_size} x accumulate {f.accumulate} ({f.world_size} GPUs = "
        f"{f.data_parallel_size} sequence-parallel groups of {SP_KEY}={f.sequence_parallel_size})"
    )


def format_dry_run(cfg: DictConfig, run: DryRun) -> str:
    """The dry-run report as text."""
    f = run.facts
    tokens = math.prod(f.grid)
    m = run.memory
    d, t = run.macs_dense, run.macs_t3
    spc = run.sequence_parallel
    lines = [
        f"dry run of {cfg.experiment_name}: {f.preset}, {cfg.data.height}x{cfg.data.width}x{cfg.data.num_frames} "
        f"-> latents {f.latent_shape} -> token grid {f.grid}",
        f"tokens per sample: {tokens:,} video + 512 text",
        f"parameters: {run.num_params:,} ({run.num_trainable:,} trainable, finetune.trainable={cfg.finetune.trainable})",
        _batch_line(cfg, f),
        run.describe,
        "MACs of one forward per sample (dense -> T3):",
        f"  self-attention: {d.self_attention:.3e} -> {t.self_attention:.3e} ({d.self_attention / t.self_attention:.1f}x less)",
        f"  whole DiT:      {d.total:.3e} -> {t.total:.3e} ({d.total / t.total:.2f}x less)",
        f"  per training step (global batch, fwd+bwd{'+recompute' if cfg.finetune.gradient_checkpointing else ''}): "
        f"{run.speed_dense['flops_per_sample'] * cfg.batch.global_size:.3e} -> "
        f"{run.speed_t3['flops_per_sample'] * cfg.batch.global_size:.3e} FLOPs",
        f"memory per GPU ({_strategy_name(cfg)}, {f.world_size} GPUs, {cfg.trainer.precision}"
        + (
            f"; {SP_KEY}={f.sequence_parallel_size}: {spc.shard_tokens:,} of {tokens:,} tokens per GPU"
            if spc
            else ""
        )
        + "):",
        f"  parameters {m.params / GIB:8.2f} GiB   gradients {m.grads / GIB:8.2f} GiB   optimizer {m.optimizer / GIB:8.2f} GiB"
        + (f"   (CPU offload {m.cpu_offloaded / GIB:.2f} GiB)" if m.cpu_offloaded else ""),
        f"  activations {m.activations / GIB:7.2f} GiB (micro-batch {cfg.batch.micro_size}, "
        f"{'per-block checkpointing' if cfg.finetune.gradient_checkpointing else 'no checkpointing'}"
        + (
            f", {spc.attention_bytes * cfg.batch.micro_size / GIB:.2f} GiB of them SP attention buffers"
            if spc
            else ""
        )
        + (
            f", {m.activations_cpu / GIB:.2f} GiB of block inputs offloaded to CPU"
            if m.activations_cpu
            else ""
        )
        + ")",
        f"  total      {m.gpu_total / GIB:8.2f} GiB (estimate; see t3/memory.py for the formulas)",
        *_verdict_lines(cfg, run),
        *_sequence_parallel_lines(cfg, run),
        f"throughput at {cfg.dry_run_tflops:g} TFLOP/s per GPU (dense -> T3):",
        f"  step time  {run.speed_dense['step_time_s']:.1f} s -> {run.speed_t3['step_time_s']:.1f} s",
        f"  tokens/s   {run.speed_dense['tokens_per_s']:,.0f} -> {run.speed_t3['tokens_per_s']:,.0f} "
        f"({run.speed_t3['tokens_per_s_per_gpu']:,.0f} per GPU with T3)",
        f"  {cfg.trainer.max_steps} steps: {cfg.trainer.max_steps * run.speed_dense['step_time_s'] / 3600:.1f} h dense -> "
        f"{cfg.trainer.max_steps * run.speed_t3['step_time_s'] / 3600:.1f} h with T3",
    ]
    return "\n".join(lines)


def dry_run(cfg: DictConfig, facts: RunFacts) -> tuple[dict[str, float], dict[str, Any]]:
    """Build the dry run, log its report, return ``(metrics, objects)`` like `t3.training.train`."""
    run = build_dry_run(cfg, facts)
    logger.info("\n%s", format_dry_run(cfg, run))
    sp = run.sequence_parallel.communication if run.sequence_parallel else None
    metrics = {
        "dry_run/tokens_per_sample": float(math.prod(facts.grid)),
        "dry_run/macs_dense": float(run.macs_dense.total),
        "dry_run/macs_t3": float(run.macs_t3.total),
        "dry_run/attention_macs_dense": float(run.macs_dense.self_attention),
        "dry_run/attention_macs_t3": float(run.macs_t3.self_attention),
        "dry_run/params_gib_per_gpu": run.memory.params / GIB,
        "dry_run/grads_gib_per_gpu": run.memory.grads / GIB,
        "dry_run/optimizer_gib_per_gpu": run.memory.optimizer / GIB,
        "dry_run/activations_gib_per_gpu": run.memory.activations / GIB,
        "dry_run/total_gib_per_gpu": run.memory.gpu_total / GIB,
        "dry_run/tokens_per_s_t3": run.speed_t3["tokens_per_s"],
        "dry_run/tokens_per_s_dense": run.speed_dense["tokens_per_s"],
        "dry_run/num_trainable": float(run.num_trainable),
        "dry_run/fits": float(run.verdict.fits),
        "dry_run/gpu_margin_gib": run.verdict.margin / GIB,
        "dry_run/fewest_gpus": float(run.verdict.fewest_gpus or "nan"),
        "dry_run/host_gib_per_node": run.verdict.host_per_node / GIB,
        "dry_run/pinned_host_gib_per_node": run.verdict.pinned_per_node / GIB,
        "dry_run/sequence_parallel_size": float(facts.sequence_parallel_size),
        "dry_run/data_parallel_size": float(facts.data_parallel_size),
        "dry_run/sp_bytes_per_step_per_gpu": sp.total if sp else 0.0,
        "dry_run/sp_exchange_bytes_per_step_per_gpu": sp.exchange if sp else 0.0,
        "dry_run/sp_ulysses_bytes_per_step_per_gpu": sp.ulysses if sp else 0.0,
        "dry_run/sp_attention_imbalance": run.sequence_parallel.attention_imbalance if sp else 0.0,
        "dry_run/suggested_sequence_parallel_size": float(run.verdict.suggested_sp or "nan"),
    }
    return metrics, {"cfg": cfg, "dry_run": run}

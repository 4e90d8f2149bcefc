"""Dry run: build a run on the meta device and report its size, cost and memory, with no weights.

``python train.py experiment=t3_4k dry_run=true`` validates the config, builds the DiT on
``torch.device("meta")``, applies the T3 swap and the trainable-parameter selection, constructs the
strategy and the optimizer, and logs:

* tokens per sample and the per-layer T3 plans (`Schedule.describe`);
* multiply-accumulates of one forward per sample, dense vs T3 (`t3.attention.flops.dit_macs`);
* parameter, gradient and optimizer memory per GPU for the strategy and GPU count (`state_memory`);
* an activation-memory estimate with per-block checkpointing (`activation_memory`);
* the step time and tokens/s implied by ``dry_run_tflops`` sustained per GPU (`throughput`).

Memory formulas (bytes per parameter; ``N`` = GPUs; ``P`` all DiT parameters, ``T`` trainable ones):

* DeepSpeed, bf16 (mixed precision as in the ZeRO paper): bf16 weights ``2P``, bf16 gradients ``2T``, fp32
  master weights + Adam moments ``12T``. ZeRO-1 partitions the ``12T``, ZeRO-2 also the ``2T``, ZeRO-3
  everything; ``offload_optimizer`` moves the ``12T`` to CPU memory, ``offload_parameters`` the ``2P``.
  In fp32 (CPU runs): ``4P + 4T + 8T`` (no master copy), partitioned the same way.
* DDP / one device (fp32 weights under bf16 autocast): ``4P + 4T + 8T``, nothing partitioned.
* FSDP2 (fp32 shards, bf16 compute): ``(4P + 4T + 8T) / N``, plus one gathered block in bf16.

Activations (bytes; ``L`` tokens per sample, ``d`` hidden size, ``F`` FFN size, ``n`` blocks, ``b`` 2 for
bf16 else 4, ``B`` micro-batch, ``k`` T3 branches computed, at most 2):

* what one Wan block saves for backward, per token: ``(18 + 4k) d + 2F`` values (norm inputs and
  modulated outputs, q/k/v before and after RMSNorm and RoPE, the T3 gathered q/k/v/output per branch,
  attention and cross-attention outputs, FFN hidden before and after GELU, residual gates);
* with checkpointing: the ``n`` block inputs ``n L d b`` plus one block recomputed in backward
  ``L ((18 + 4k) d + 2F) b``; without: ``n`` blocks; ``offload_activations`` moves the block inputs to
  CPU memory. Times ``B``. An estimate, not a measurement: allocator fragmentation, the attention kernel's
  own workspace and temporary copies come on top.

Throughput: one training sample costs ``2 * MACs`` FLOPs forward, twice that backward and, with
checkpointing, one more forward: ``(3 + 1) * 2 * MACs``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from t3.attention.flops import MacBreakdown, dit_macs
from t3.config import FinetuneConfig, ModelConfig, RunFacts, StrategyConfig
from t3.training.params import select_trainable

__all__ = [
    "MemoryEstimate",
    "RunPlan",
    "activation_memory",
    "build_plan",
    "dry_run",
    "format_plan",
    "state_memory",
    "throughput",
]

logger = logging.getLogger(__name__)

GIB = 2**30


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU (and per process on the CPU side) for model state and activations."""

    params: float
    grads: float
    optimizer: float
    cpu_offloaded: float
    activations: float
    activations_cpu: float

    @property
    def gpu_total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations


def state_memory(
    *,
    num_params: int,
    num_trainable: int,
    strategy: StrategyConfig,
    world_size: int,
    bf16: bool,
) -> tuple[float, float, float, float]:
    """Parameter, gradient and optimizer bytes per GPU, and bytes offloaded to CPU (see module docstring).

    Args:
        num_params: All DiT parameters ``P`` (LoRA adapters included).
        num_trainable: Trainable parameters ``T``.
        strategy: The strategy config (name, ZeRO stage, offload flags).
        world_size: GPUs ``N``.
        bf16: bf16 mixed precision (else fp32).

    Returns:
        ``(params, grads, optimizer, cpu_offloaded)`` in bytes.
    """
    n, p, t = world_size, num_params, num_trainable
    if strategy.name == "deepspeed":
        w, g, o = (2 * p, 2 * t, 12 * t) if bf16 else (4 * p, 4 * t, 8 * t)
        stage = strategy.zero_stage
        o /= n
        if stage >= 2:
            g /= n
        if stage >= 3:
            w /= n
        cpu = 0.0
        if strategy.offload_optimizer:
            cpu += o
            o = 0.0
        if strategy.offload_parameters:
            cpu += w
            w = 0.0
        return w, g, o, cpu
    w, g, o = 4 * p, 4 * t, 8 * t
    if strategy.name == "fsdp2":
        w, g, o = w / n, g / n, o / n
    return float(w), float(g), float(o), 0.0


def activation_memory(
    *,
    tokens: int,
    dim: int,
    ffn_dim: int,
    num_layers: int,
    micro_batch: int,
    bytes_per_value: int,
    branches: int,
    checkpointing: bool,
    offload: bool,
) -> tuple[float, float]:
    """Activation bytes on the GPU and in CPU memory for one micro-batch (see module docstring)."""
    per_block = tokens * ((18 + 4 * branches) * dim + 2 * ffn_dim) * bytes_per_value
    inputs = num_layers * tokens * dim * bytes_per_value
    if not checkpointing:
        return float(micro_batch * num_layers * per_block), 0.0
    if offload:
        return float(micro_batch * per_block), float(micro_batch * inputs)
    return float(micro_batch * (inputs + per_block)), 0.0


def throughput(
    macs_per_sample: int, *, tokens: int, tflops: float, num_gpus: int, global_batch: int, checkpointing: bool
) -> dict[str, float]:
    """Step time and token rates implied by ``tflops`` sustained TFLOP/s per GPU."""
    passes = 4 if checkpointing else 3  # forward, backward (2x), recompute
    flops_per_sample = passes * 2 * macs_per_sample
    step_time = global_batch * flops_per_sample / (num_gpus * tflops * 1e12)
    return {
        "flops_per_sample": float(flops_per_sample),
        "step_time_s": step_time,
        "tokens_per_s": global_batch * tokens / step_time,
        "tokens_per_s_per_gpu": global_batch * tokens / step_time / num_gpus,
    }


@dataclass
class RunPlan:
    """A run built on the meta device, with its cost model."""

    facts: RunFacts
    dit: torch.nn.Module
    num_params: int
    num_trainable: int
    macs_dense: MacBreakdown
    macs_t3: MacBreakdown
    memory: MemoryEstimate
    speed_dense: dict[str, float]
    speed_t3: dict[str, float]
    strategy: Any
    optimizer: torch.optim.Optimizer
    describe: str


def build_plan(cfg: DictConfig, facts: RunFacts) -> RunPlan:
    """Build the DiT, T3 swap, trainable selection, strategy and optimizer on the meta device; cost them.

    Args:
        cfg: A validated training config.
        facts: What `t3.config.validate` derived from it.
    """
    import t3
    from t3.models import get_spec
    from t3.training.module import build_dit
    from t3.training.optim import build_optimizer
    from t3.training.strategies import build_strategy

    # Only the architecture is needed: weight paths may still be ??? in a dry run.
    model_cfg = ModelConfig(preset=cfg.model.preset, attention_backend=cfg.model.attention_backend)
    finetune: FinetuneConfig = OmegaConf.to_object(cfg.finetune)  # type: ignore[assignment]
    strategy_cfg: StrategyConfig = OmegaConf.to_object(cfg.strategy)  # type: ignore[assignment]
    spec = get_spec(facts.preset)

    dit = build_dit(model_cfg, device="meta")
    t3.transform(dit, facts.schedule, backend=model_cfg.attention_backend)
    lora = finetune.lora
    summary = select_trainable(
        dit,
        finetune.trainable,
        lora={
            "rank": lora.rank,
            "alpha": lora.alpha,
            "dropout": lora.dropout,
            "target_modules": list(lora.target_modules),
        },
    )
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
    weights, grads, opt_state, cpu = state_memory(
        num_params=summary.total,
        num_trainable=summary.trainable,
        strategy=strategy_cfg,
        world_size=facts.world_size,
        bf16=bf16,
    )
    branches = max(len(lp.computed) for lp in facts.schedule.plans(facts.grid, facts.num_layers))
    act_gpu, act_cpu = activation_memory(
        tokens=tokens,
        dim=spec.dim,
        ffn_dim=int(config["ffn_dim"]),
        num_layers=facts.num_layers,
        micro_batch=cfg.batch.micro_size,
        bytes_per_value=2 if bf16 else 4,
        branches=branches,
        checkpointing=finetune.gradient_checkpointing,
        offload=finetune.offload_activations,
    )
    memory = MemoryEstimate(weights, grads, opt_state, cpu, act_gpu, act_cpu)
    speed = {
        name: throughput(
            macs.total,
            tokens=tokens,
            tflops=cfg.dry_run_tflops,
            num_gpus=facts.world_size,
            global_batch=cfg.batch.global_size,
            checkpointing=finetune.gradient_checkpointing,
        )
        for name, macs in (("dense", macs_dense), ("t3", macs_t3))
    }
    return RunPlan(
        facts=facts,
        dit=dit,
        num_params=summary.total,
        num_trainable=summary.trainable,
        macs_dense=macs_dense,
        macs_t3=macs_t3,
        memory=memory,
        speed_dense=speed["dense"],
        speed_t3=speed["t3"],
        strategy=strategy,
        optimizer=optimizer,
        describe=facts.schedule.describe(facts.grid, facts.schedule.period),
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


def format_plan(cfg: DictConfig, plan: RunPlan) -> str:
    """The dry-run report as text."""
    f = plan.facts
    tokens = math.prod(f.grid)
    m = plan.memory
    d, t = plan.macs_dense, plan.macs_t3
    lines = [
        f"dry run of {cfg.experiment_name}: {f.preset}, {cfg.data.height}x{cfg.data.width}x{cfg.data.num_frames} "
        f"-> latents {f.latent_shape} -> token grid {f.grid}",
        f"tokens per sample: {tokens:,} video + 512 text",
        f"parameters: {plan.num_params:,} ({plan.num_trainable:,} trainable, finetune.trainable={cfg.finetune.trainable})",
        f"batch: global {cfg.batch.global_size} = micro {cfg.batch.micro_size} x {f.world_size} GPUs x accumulate {f.accumulate}",
        plan.describe,
        "MACs of one forward per sample (dense -> T3):",
        f"  self-attention: {d.self_attention:.3e} -> {t.self_attention:.3e} ({d.self_attention / t.self_attention:.1f}x less)",
        f"  whole DiT:      {d.total:.3e} -> {t.total:.3e} ({d.total / t.total:.2f}x less)",
        f"  per training step (global batch, fwd+bwd{'+recompute' if cfg.finetune.gradient_checkpointing else ''}): "
        f"{plan.speed_dense['flops_per_sample'] * cfg.batch.global_size:.3e} -> "
        f"{plan.speed_t3['flops_per_sample'] * cfg.batch.global_size:.3e} FLOPs",
        f"memory per GPU ({_strategy_name(cfg)}, {f.world_size} GPUs, {cfg.trainer.precision}):",
        f"  parameters {m.params / GIB:8.2f} GiB   gradients {m.grads / GIB:8.2f} GiB   optimizer {m.optimizer / GIB:8.2f} GiB"
        + (f"   (CPU offload {m.cpu_offloaded / GIB:.2f} GiB)" if m.cpu_offloaded else ""),
        f"  activations {m.activations / GIB:7.2f} GiB (micro-batch {cfg.batch.micro_size}, "
        f"{'per-block checkpointing' if cfg.finetune.gradient_checkpointing else 'no checkpointing'}"
        + (
            f", {m.activations_cpu / GIB:.2f} GiB of block inputs offloaded to CPU"
            if m.activations_cpu
            else ""
        )
        + ")",
        f"  total      {m.gpu_total / GIB:8.2f} GiB (estimate; see t3/training/plan.py for the formulas)",
        f"throughput at {cfg.dry_run_tflops:g} TFLOP/s per GPU (dense -> T3):",
        f"  step time  {plan.speed_dense['step_time_s']:.1f} s -> {plan.speed_t3['step_time_s']:.1f} s",
        f"  tokens/s   {plan.speed_dense['tokens_per_s']:,.0f} -> {plan.speed_t3['tokens_per_s']:,.0f} "
        f"({plan.speed_t3['tokens_per_s_per_gpu']:,.0f} per GPU with T3)",
        f"  {cfg.trainer.max_steps} steps: {cfg.trainer.max_steps * plan.speed_dense['step_time_s'] / 3600:.1f} h dense -> "
        f"{cfg.trainer.max_steps * plan.speed_t3['step_time_s'] / 3600:.1f} h with T3",
    ]
    return "\n".join(lines)


def dry_run(cfg: DictConfig, facts: RunFacts) -> tuple[dict[str, float], dict[str, Any]]:
    """Build the plan, log the report, return ``(metrics, objects)`` like `t3.training.train`."""
    plan = build_plan(cfg, facts)
    logger.info("\n%s", format_plan(cfg, plan))
    metrics = {
        "dry_run/tokens_per_sample": float(math.prod(facts.grid)),
        "dry_run/macs_dense": float(plan.macs_dense.total),
        "dry_run/macs_t3": float(plan.macs_t3.total),
        "dry_run/attention_macs_dense": float(plan.macs_dense.self_attention),
        "dry_run/attention_macs_t3": float(plan.macs_t3.self_attention),
        "dry_run/params_gib_per_gpu": plan.memory.params / GIB,
        "dry_run/grads_gib_per_gpu": plan.memory.grads / GIB,
        "dry_run/optimizer_gib_per_gpu": plan.memory.optimizer / GIB,
        "dry_run/activations_gib_per_gpu": plan.memory.activations / GIB,
        "dry_run/total_gib_per_gpu": plan.memory.gpu_total / GIB,
        "dry_run/tokens_per_s_t3": plan.speed_t3["tokens_per_s"],
        "dry_run/tokens_per_s_dense": plan.speed_dense["tokens_per_s"],
        "dry_run/num_trainable": float(plan.num_trainable),
    }
    return metrics, {"cfg": cfg, "plan": plan}

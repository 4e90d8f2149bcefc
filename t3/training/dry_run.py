"""Dry run: build a run on the meta device and answer "does it fit, on how many GPUs, how fast".

``python train.py experiment=t3_4k dry_run=true`` validates the config, builds the DiT on
``torch.device("meta")``, applies the T3 swap and the trainable-parameter selection, constructs the
strategy and the optimizer, and logs:

* tokens per sample and the per-layer T3 plans (`Schedule.describe`);
* multiply-accumulates of one forward per sample, dense vs T3 (`t3.attention.flops.dit_macs`);
* model state and activation memory per GPU for the strategy and GPU count (``dry_run_num_gpus``;
  formulas in `t3.memory`), and the verdict against a GPU of ``dry_run_gpu_memory_gib``: the margin,
  or how far over; the fewest GPUs that fit (or that none does, when activations alone are too large:
  they do not shrink with more GPUs without sequence parallelism); the host memory per node that
  offloading needs (pinned, for activation offload);
* the step time and tokens/s implied by ``dry_run_tflops`` sustained per GPU (`throughput`).

Throughput: a forward costs ``2 * MACs`` FLOPs; backward two forwards for attention's weight-free
products and for linear layers whose weights train (input and weight gradients), one forward for
frozen ones (input gradient only), so LoRA and attention-only runs cost less than a full fine-tune;
checkpointing adds one forward (`training_macs_per_sample`).
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
from t3.memory import GIB, MemoryEstimate, activation_memory, state_memory
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
        fewest_gpus: The smallest world size (dividing the global batch into micro-batches) whose
            estimate fits, or None when none does.
        gpus_per_node: GPUs per node (``trainer.devices``; `GPUS_PER_NODE` for ``auto``).
        host_per_node: Host memory per node for offloaded model state and activations.
        pinned_per_node: Of ``host_per_node``, the pinned activation-offload buffers.
    """

    gpu_bytes: float
    margin: float
    fewest_gpus: int | None
    gpus_per_node: int
    host_per_node: float
    pinned_per_node: float

    @property
    def fits(self) -> bool:
        return self.margin >= 0


def _verdict(cfg: DictConfig, facts: RunFacts, memory: MemoryEstimate, state_at: Any) -> Verdict:
    budget = cfg.dry_run_gpu_memory_gib * GIB
    per_step = cfg.batch.global_size // cfg.batch.micro_size
    counts = [1] if cfg.strategy.name == "auto" else [n for n in range(1, per_step + 1) if per_step % n == 0]
    fewest = next((n for n in counts if sum(state_at(n)) + memory.activations <= budget), None)
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
    )


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
        verdict=_verdict(cfg, facts, memory, state_at),
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
    if v.fewest_gpus is not None:
        lines.append(
            f"  fewest GPUs that fit: {v.fewest_gpus} (world sizes that divide batch.global_size / "
            f"batch.micro_size; check another with dry_run_num_gpus=N)"
        )
    else:
        ft = cfg.finetune
        remedies = [
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
            f"  no GPU count fits: activations alone are {m.activations / GIB:.2f} GiB per GPU; try "
            + ", or ".join(remedies)
        )
    if m.host_total:
        parts = (
            [f"{v.pinned_per_node / GIB:.2f} GiB pinned for activation offload"] if v.pinned_per_node else []
        )
        if v.host_per_node > v.pinned_per_node:
            parts.append(f"{(v.host_per_node - v.pinned_per_node) / GIB:.2f} GiB for DeepSpeed offload")
        lines.append(f"  host memory per node ({min(world, v.gpus_per_node)} GPUs): " + " + ".join(parts))
    if world > 1 and m.activations >= m.state or not v.fits:
        lines.append(
            f"  note: activations ({m.activations / GIB:.2f} GiB per GPU) do not shrink with more GPUs: every "
            "GPU holds whole samples (training has no sequence-parallel setting yet); more GPUs divide only the "
            "sharded model state"
        )
    return lines


def format_dry_run(cfg: DictConfig, run: DryRun) -> str:
    """The dry-run report as text."""
    f = run.facts
    tokens = math.prod(f.grid)
    m = run.memory
    d, t = run.macs_dense, run.macs_t3
    lines = [
        f"dry run of {cfg.experiment_name}: {f.preset}, {cfg.data.height}x{cfg.data.width}x{cfg.data.num_frames} "
        f"-> latents {f.latent_shape} -> token grid {f.grid}",
        f"tokens per sample: {tokens:,} video + 512 text",
        f"parameters: {run.num_params:,} ({run.num_trainable:,} trainable, finetune.trainable={cfg.finetune.trainable})",
        f"batch: global {cfg.batch.global_size} = micro {cfg.batch.micro_size} x {f.world_size} GPUs x accumulate {f.accumulate}",
        run.describe,
        "MACs of one forward per sample (dense -> T3):",
        f"  self-attention: {d.self_attention:.3e} -> {t.self_attention:.3e} ({d.self_attention / t.self_attention:.1f}x less)",
        f"  whole DiT:      {d.total:.3e} -> {t.total:.3e} ({d.total / t.total:.2f}x less)",
        f"  per training step (global batch, fwd+bwd{'+recompute' if cfg.finetune.gradient_checkpointing else ''}): "
        f"{run.speed_dense['flops_per_sample'] * cfg.batch.global_size:.3e} -> "
        f"{run.speed_t3['flops_per_sample'] * cfg.batch.global_size:.3e} FLOPs",
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
        f"  total      {m.gpu_total / GIB:8.2f} GiB (estimate; see t3/memory.py for the formulas)",
        *_verdict_lines(cfg, run),
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
    }
    return metrics, {"cfg": cfg, "dry_run": run}

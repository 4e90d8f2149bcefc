"""Memory estimates from shapes alone, and the memory of the device they are checked against.

The one owner of "how much memory does this need", so that a run too large for its machine stops
before anything is built, with one line saying what to run instead, instead of being OOM-killed
minutes later without a message:

* `inference_memory`: one DiT forward without autograd (a sampler step, ``stage=speed``'s DiT step);
  checked by generation and the speed stage (`check_inference_memory`);
* `state_memory`, `activation_memory` (`MemoryEstimate`): model state and activations per GPU of a
  training step; the dry run (`t3.training.dry_run`) reports them against a GPU size, with the fewest
  GPUs that fit and the host memory that offloading needs;
* `available_memory`: what a device has free: CUDA's free memory, or on a CPU the host's available
  memory within the job's cgroup limit (a SLURM allocation).

The estimates count what is alive at the worst moment of the computation from the tensor shapes of
the diffusers ``WanTransformer3DModel``; allocator fragmentation and kernel workspaces come on top.

Training formulas (bytes per parameter; ``N`` = GPUs; ``P`` all DiT parameters, ``T`` trainable ones):

* DeepSpeed, bf16 (mixed precision as in the ZeRO paper): bf16 weights ``2P``, bf16 gradients ``2T``, fp32
  master weights + Adam moments ``12T``. ZeRO-1 partitions the ``12T``, ZeRO-2 also the ``2T``, ZeRO-3
  everything; ``offload_optimizer`` moves the ``12T`` to CPU memory, ``offload_parameters`` the ``2P``.
  In fp32 (CPU runs): ``4P + 4T + 8T`` (no master copy), partitioned the same way.
* DDP / one device (fp32 weights under bf16 autocast): ``4P + 4T + 8T``, nothing partitioned.
* FSDP2 (fp32 shards, bf16 compute): ``(4P + 4T + 8T) / N``.

Activations (bytes; ``L`` tokens per sample, ``d`` hidden size, ``F`` FFN size, ``n`` blocks, ``b`` 2 for
bf16 else 4, ``B`` micro-batch, ``k`` T3 branches computed, at most 2):

* what one Wan block saves for backward, per token: ``(18 + 4k) d + 2F`` values (norm inputs and
  modulated outputs, q/k/v before and after RMSNorm and RoPE, the T3 gathered q/k/v/output per branch,
  attention and cross-attention outputs, FFN hidden before and after GELU, residual gates);
* with checkpointing: the ``n`` block inputs ``n L d b`` plus one block recomputed in backward
  ``L ((18 + 4k) d + 2F) b``; without: ``n`` blocks; ``offload_activations`` moves the block inputs to
  (pinned) CPU memory. Times ``B``.
* Activations are per sample, so more data-parallel GPUs do not shrink them: only sequence
  parallelism does (``parallel.sequence_parallel_size`` ``S``: each sample's tokens split over ``S``
  GPUs, `t3.parallel`). Each GPU then holds its shard of ``P`` tokens (``ceil(L / S)``, or whole frames
  with ``parallel.align=frames``): every per-token term above uses ``P``, and the grouped copies ``4 k d``
  per token are replaced by what one layer's SP attention holds on the GPU, ``4 D b (n_send + n_recv +
  units S)``: the exchange's send and receive buffers of q, k, v and partial outputs, and the kernel's
  grouped copies over its units (`t3.parallel.cost`; the largest over layers and ranks, which the
  caller passes as ``attention_bytes``).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from t3.models.presets import ModelSpec

if TYPE_CHECKING:
    from t3.config import StrategyConfig

__all__ = [
    "GIB",
    "DoesNotFitError",
    "InferenceMemory",
    "MemoryEstimate",
    "activation_memory",
    "available_memory",
    "check_inference_memory",
    "dit_parameter_count",
    "inference_memory",
    "state_memory",
]

GIB = 2**30

#: Sizes suggested when a request does not fit, largest first (the Wan family's usual sizes).
#: A suggestion must fit with this share of the free memory to spare: the estimates are lower bounds.
SUGGESTION_HEADROOM = 0.5
SMALLER_SIZES: tuple[tuple[int, int], ...] = (
    (1088, 1920),
    (720, 1280),
    (704, 1280),
    (480, 832),
    (256, 448),
    (128, 224),
    (64, 64),
)


class DoesNotFitError(ValueError):
    """A run that cannot fit in its device's memory; the message is one line saying what to run instead."""


@functools.cache
def dit_parameter_count(preset: str) -> int:
    """Parameters of the DiT of ``preset``, counted on the meta device (nothing is allocated)."""
    from t3.models.build import dit_from_preset

    model = dit_from_preset(preset, device="meta")
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class InferenceMemory:
    """Bytes one DiT forward without autograd needs at least: weights and activations."""

    weights: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.activations


def inference_memory(
    spec: ModelSpec, grid: Sequence[int], *, batch: int, dtype: torch.dtype, sequence_parallel: int = 1
) -> InferenceMemory:
    """A lower bound of the memory of one DiT forward without autograd.

    At the feed-forward of any block, four tensors are alive at once: the residual stream and the
    normalised FFN input ``[B, L, d]``, and the FFN hidden layer before and after GELU ``[B, L, F]``,
    all in the compute dtype; with them the RoPE tables that diffusers keeps for the whole forward
    (cosine and sine, ``[L, head_dim]`` in float64). Weights: every DiT parameter in the compute dtype.

    Args:
        spec: The model.
        grid: Post-patch token grid ``(T, H, W)``.
        batch: Samples per forward (2 with batched classifier-free guidance).
        dtype: Compute dtype.
        sequence_parallel: GPUs sharing the tokens (`t3.parallel`): each holds ``ceil(L / sp)`` of them
            in every block; the RoPE tables are still built whole (then cut to the shard).
    """
    config = spec.dit_config
    tokens = math.prod(grid)
    local = math.ceil(tokens / sequence_parallel)
    hidden = batch * local * 2 * (int(config["ffn_dim"]) + spec.dim) * dtype.itemsize
    rope = 2 * tokens * int(config["attention_head_dim"]) * torch.float64.itemsize
    return InferenceMemory(weights=dit_parameter_count(spec.name) * dtype.itemsize, activations=hidden + rope)


def _cgroup_free_bytes() -> int | None:
    """Memory left under this process's cgroup v2 limit (what a SLURM job may use), or None."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return None


def _host_available_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")  # free pages: an underestimate


def available_memory(device: torch.device | str) -> tuple[int, str]:
    """Bytes free on ``device`` now, and where that figure comes from (for messages).

    CUDA: the driver's free memory on that GPU. CPU: the host's available memory (``MemAvailable``),
    or less when the process's cgroup (a SLURM job) has a lower limit.
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free on {torch.cuda.get_device_name(device)}"
    free, where = _host_available_bytes(), "available host memory"
    cgroup = _cgroup_free_bytes()
    if cgroup is not None and cgroup < free:
        free, where = cgroup, "left under this job's memory limit (cgroup)"
    return max(int(free), 0), where


def _fits(spec: ModelSpec, frames: int, height: int, width: int, *, batch: int, dtype: torch.dtype,
          budget: float, weights_loaded: bool, sequence_parallel: int) -> bool:  # fmt: skip
    try:
        grid = spec.video_token_grid(frames, height, width)
    except ValueError:
        return False
    need = inference_memory(spec, grid, batch=batch, dtype=dtype, sequence_parallel=sequence_parallel)
    return (need.activations if weights_loaded else need.total) <= budget


def check_inference_memory(
    spec: ModelSpec,
    size: tuple[int, int, int],
    *,
    batch: int,
    dtype: torch.dtype,
    device: torch.device | str,
    what: str,
    instead: str = "",
    size_keys: tuple[str, str] = ("height", "width"),
    weights_loaded: bool = False,
    sequence_parallel: int = 1,
) -> InferenceMemory:
    """Refuse, before anything is built, a DiT forward that cannot fit on ``device``.

    Args:
        spec: The model.
        size: ``(height, width, frames)`` of the video.
        batch: Samples per DiT forward (2 with batched classifier-free guidance).
        dtype: Compute dtype.
        device: Where the forward will run.
        what: What is refused, for the message (``"stage=speed"``, ``"generation"``).
        instead: The first thing the message suggests instead, e.g. ``"speed.macs_only=true (MAC counts
            without a model)"``; a smaller size that fits with room to spare follows.
        size_keys: How the caller spells height and width (``generation.height``...).
        weights_loaded: The DiT is already on the device: count only its activations against the free
            memory.
        sequence_parallel: GPUs of an SP group sharing each video's tokens (``device`` is one of them).

    Returns:
        The estimate, when it fits.

    Raises:
        ValueError: The size is not legal for the model or beyond its RoPE table.
        DoesNotFitError: One line with the estimate, the free memory and what to run instead.
    """
    height, width, frames = size
    grid = spec.video_token_grid(frames, height, width)
    need = inference_memory(spec, grid, batch=batch, dtype=dtype, sequence_parallel=sequence_parallel)
    free, where = available_memory(device)
    if (need.activations if weights_loaded else need.total) <= free:
        return need
    smaller = next(
        (
            (h, w)
            for h, w in SMALLER_SIZES
            if h * w < height * width
            and _fits(spec, frames, h, w, batch=batch, dtype=dtype, budget=SUGGESTION_HEADROOM * free,
                      weights_loaded=weights_loaded, sequence_parallel=sequence_parallel)
        ),
        None,
    )  # fmt: skip
    options = [instead] if instead else []
    if smaller is not None:
        options.append(f"a smaller size, e.g. {size_keys[0]}={smaller[0]} {size_keys[1]}={smaller[1]}")
    else:
        options.append("a machine with more memory")
    weights = "" if weights_loaded else f"{need.weights / GIB:.1f} GiB of weights + "
    shared = (
        f" over {sequence_parallel} GPUs (parallel.sequence_parallel_size)" if sequence_parallel > 1 else ""
    )
    raise DoesNotFitError(
        f"{what}: one DiT forward of {spec.name} at {height}x{width}x{frames} ({math.prod(grid):,} tokens"
        f"{shared}, batch {batch}, {str(dtype).removeprefix('torch.')}) needs at least {weights}"
        f"{need.activations / GIB:.1f} GiB of activations, but the {torch.device(device).type} has "
        f"{free / GIB:.1f} GiB {where}; run instead: " + ", or ".join(options)
    )


# --- training ---------------------------------------------------------------------------------------------


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
    def state(self) -> float:
        """Parameters, gradients and optimizer state on the GPU."""
        return self.params + self.grads + self.optimizer

    @property
    def gpu_total(self) -> float:
        return self.state + self.activations

    @property
    def host_total(self) -> float:
        """CPU memory per GPU process: offloaded model state and offloaded activations (pinned)."""
        return self.cpu_offloaded + self.activations_cpu


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
    attention_bytes: float | None = None,
) -> tuple[float, float]:
    """Activation bytes on the GPU and in CPU memory for one micro-batch (see module docstring).

    Args:
        tokens: Video tokens of a sample on this GPU: ``L``, or under sequence parallelism its shard
            (`t3.parallel.ShardLayout.shard_size`).
        branches: T3 branches computed ``k`` (at most 2); their grouped copies count ``4 k d`` per token.
        attention_bytes: Under sequence parallelism, the bytes per sample one layer's attention holds
            on this GPU (`t3.parallel.cost.peak_attention_bytes`), in place of the grouped copies.
    """
    if attention_bytes is None:
        per_block = tokens * ((18 + 4 * branches) * dim + 2 * ffn_dim) * bytes_per_value
    else:
        per_block = tokens * (18 * dim + 2 * ffn_dim) * bytes_per_value + attention_bytes
    inputs = num_layers * tokens * dim * bytes_per_value
    if not checkpointing:
        return float(micro_batch * num_layers * per_block), 0.0
    if offload:
        return float(micro_batch * per_block), float(micro_batch * inputs)
    return float(micro_batch * (inputs + per_block)), 0.0

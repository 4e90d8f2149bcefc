"""The schema of the training config (``conf/train.yaml``): one dataclass per config group.

`register_configs` stores `TrainConfig` in Hydra's ConfigStore as ``train_schema``, which
``conf/train.yaml`` lists first in its defaults, so every group file (``model/``, ``data/``,
``strategy/`` ...) is merged onto a typed node. A misspelt key or a value of the wrong type then fails at
composition, naming the key. What types cannot say (sizes, ranges, how settings combine) is checked by
`t3.config.validation`.

Hydra itself is imported lazily (only `register_configs` needs it), so the dataclasses can be imported by
code that must not depend on Hydra.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from t3.demo.settings import DemoConfig

__all__ = [
    "ACCELERATORS",
    "DATA_SOURCES",
    "EXPORT_FORMATS",
    "LR_SCHEDULES",
    "PRECISIONS",
    "STRATEGIES",
    "TRAINABLE",
    "TRAIN_ENTRY",
    "BatchConfig",
    "CheckpointConfig",
    "DataConfig",
    "EMAConfig",
    "ExportConfig",
    "FinetuneConfig",
    "LoggerConfig",
    "LoraConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "OptimConfig",
    "ParallelConfig",
    "PathsConfig",
    "SampleVideosConfig",
    "StrategyConfig",
    "TrainConfig",
    "TrainerConfig",
    "ValidationConfig",
    "register_configs",
]

#: Which DiT weights are trained: every weight (the paper), self-attention q/k/v/o only, or LoRA adapters.
TRAINABLE = ("all", "attention", "lora")
STRATEGIES = ("auto", "ddp", "deepspeed", "fsdp2")
PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-mixed")
ACCELERATORS = ("cpu", "gpu", "cuda", "auto")
LR_SCHEDULES = ("constant", "cosine")
DATA_SOURCES = ("synthetic", "latent_shards", "raw_videos")
EXPORT_FORMATS = ("diffusers", "wan")
#: The ``entry`` of a training config: `t3.training.train.main`.
TRAIN_ENTRY = "t3.training.train:main"


@dataclass
class ModelConfig:
    """Which model, and where its weights are (local paths only; nothing is downloaded).

    Attributes:
        preset: A `t3.models.preset_names` entry (architecture, VAE geometry).
        default_schedule: The T3 schedule preset (`t3.attention.PRESETS`) made for this model: what
            ``t3=model_default`` (train.py's default) and eval.py without a checkpoint record use.
        dit_path: Pretrained DiT: a diffusers ``transformer`` folder or an original Wan ``.safetensors``.
        vae_path: Wan VAE folder; only needed for sample videos during validation.
        text_encoder_path: umT5 folder; needed for sample videos and for the synthetic data source.
        init_from: Start from these DiT weights instead of ``dit_path`` (stage 2 starts from the stage-1
            export, a diffusers folder).
        random_init: Build the DiT from ``preset`` with random weights (tests and debugging only); applies
            only when neither ``init_from`` nor ``dit_path`` is set (a path that is set must exist).
        seed: Seed of ``random_init``.
        attention_backend: T3 attention backend (``auto``, ``sdpa``, ``flash``).
        attention_tokens_per_call: Bound on the gathered slots per T3 attention call, which bounds
            the transient memory of the grouped q, k, v (useful for 4K inference); None: automatic.
    """

    preset: str = MISSING
    default_schedule: str = "dense"
    dit_path: str | None = None
    vae_path: str | None = None
    text_encoder_path: str | None = None
    init_from: str | None = None
    random_init: bool = False
    seed: int = 0
    attention_backend: str = "auto"
    attention_tokens_per_call: int | None = None


@dataclass
class DataConfig:
    """Training and validation data.

    Attributes:
        source: ``synthetic``, ``latent_shards`` or ``raw_videos`` (documentation and checks; the readers
            are the ``_target_`` of ``train`` and ``val``).
        height: Video height in pixels (a multiple of the model's pixel multiple).
        width: Video width in pixels.
        num_frames: Frames per clip, ``4k + 1``.
        num_workers: DataLoader worker processes per rank.
        train: Hydra ``_target_`` config of the training dataset (map-style or iterable).
        val: ``_target_`` config of the held-out dataset, or None for no validation loss.
        prepare: ``_target_`` config run once on global rank 0 before the datasets are built (e.g. encode
            raw videos into shards), or None.
        max_skipped_fraction: Stop the run when more than this fraction of the training data read so far
            was skipped as bad (judged from 1000 items read on, and at the end); None never stops.
    """

    source: str = MISSING
    height: int = MISSING
    width: int = MISSING
    num_frames: int = MISSING
    num_workers: int = 0
    train: Any = MISSING
    val: Any = None
    prepare: Any = None
    max_skipped_fraction: float | None = 0.05


@dataclass
class BatchConfig:
    """Batch sizes. ``accumulate = global_size / (micro_size * world_size)`` must be an integer.

    Attributes:
        global_size: Samples per optimizer step, summed over GPUs and accumulation (the paper: 64).
        micro_size: Samples per forward on one GPU.
    """

    global_size: int = 64
    micro_size: int = 1


@dataclass
class LoraConfig:
    """LoRA adapters (``finetune.trainable=lora``), injected with peft.

    Attributes:
        rank: Adapter rank ``r`` (the paper's LoRA variant: 64).
        alpha: Scale numerator (``alpha / r`` multiplies the update).
        dropout: Dropout on the adapter input.
        target_modules: Module-name suffixes to adapt. The default is DiffSynth-Studio's Wan LoRA set
            (``q,k,v,o,ffn.0,ffn.2``) in diffusers names: all attention projections and both FFN linears.
    """

    rank: int = 64
    alpha: float = 64.0
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]
    )


@dataclass
class FinetuneConfig:
    """What is trained and how activations are kept.

    Attributes:
        trainable: ``all`` (paper default), ``attention`` (self-attention q/k/v/o only) or ``lora``.
        lora: Adapter settings, used when ``trainable=lora``.
        gradient_checkpointing: Recompute each DiT block in backward (only block inputs are kept).
        offload_activations: Keep the saved activations in CPU memory (``torch.autograd.graph.save_on_cpu``).
    """

    trainable: str = "all"
    lora: LoraConfig = field(default_factory=LoraConfig)
    gradient_checkpointing: bool = True
    offload_activations: bool = False


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule (linear warm-up, then constant or cosine).

    Attributes:
        lr: Peak learning rate (the paper: 2e-5).
        weight_decay: Decoupled weight decay (the paper: 1e-2).
        betas: Adam betas.
        eps: Adam epsilon.
        warmup_steps: Linear warm-up from 0 over this many optimizer steps.
        schedule: ``constant`` or ``cosine`` after warm-up.
        min_lr_ratio: Cosine floor as a fraction of ``lr``.
        decay_steps: Length of the cosine decay in optimizer steps; None uses ``trainer.max_steps``.
    """

    lr: float = 2e-5
    weight_decay: float = 1e-2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "constant"
    min_lr_ratio: float = 0.0
    decay_steps: int | None = None


@dataclass
class ObjectiveConfig:
    """Flow-matching objective (`t3.diffusion`): how training draws noise levels and weighs the loss.

    The T3 authors' pipeline (DiffSynth-Studio) draws one of 1000 fixed shifted sigmas uniformly and weighs
    the MSE with a bell-shaped function of the timestep: ``shifted_discrete`` + ``bell`` (the paper-recipe
    experiments). ``shifted`` + ``none`` is the same shift drawn continuously with a plain MSE.

    Attributes:
        timestep_sampler: ``shifted_discrete`` (the authors'), ``shifted``, ``uniform`` or ``logit_normal``
            (`t3.diffusion.timesteps`).
        loss_weighting: ``bell`` (the authors') or ``none`` (`t3.diffusion.weighting`). Validation losses are
            never weighted, so runs with different weightings compare on ``val/loss``.
        flow_shift: Shift of the ``shifted`` / ``shifted_discrete`` samplers and of the ``bell`` table (the
            paper: 5).
        logit_mean: Mean of the ``logit_normal`` sampler.
        logit_std: Std of the ``logit_normal`` sampler.
        num_train_timesteps: Scale from sigma to the model's timestep input; also the size of the
            ``shifted_discrete`` / ``bell`` table (1000, as DiffSynth's ``set_timesteps(1000, training=True)``).
    """

    timestep_sampler: str = "shifted"
    loss_weighting: str = "none"
    flow_shift: float = 5.0
    logit_mean: float = 0.0
    logit_std: float = 1.0
    num_train_timesteps: int = 1000


@dataclass
class SampleVideosConfig:
    """Sample videos logged at validation (needs ``model.vae_path`` and ``model.text_encoder_path``).

    Attributes:
        enabled: Generate and log videos.
        prompts: Prompts to sample.
        height: Video height (None: ``data.height``).
        width: Video width (None: ``data.width``).
        num_frames: Frames (None: ``data.num_frames``).
        num_steps: Sampler steps.
        guidance_scale: Classifier-free guidance scale.
        seed: Noise seed of prompt 0 (prompt i uses seed + i).
        fps: Frame rate of the written mp4s.
    """

    enabled: bool = False
    prompts: list[str] = field(default_factory=lambda: ["a red panda climbing a tree, cinematic, 4k"])
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    num_steps: int = 30
    guidance_scale: float = 5.0
    seed: int = 0
    fps: float = 16.0


@dataclass
class ValidationConfig:
    """Held-out loss at fixed noise levels and fixed noise, so curves are comparable across steps and runs.

    Attributes:
        every_n_steps: Validate every this many optimizer steps (0 disables validation).
        num_batches: Validation batches per rank.
        sigmas: Noise levels evaluated for every validation sample.
        seed: Seed of the fixed validation noise.
        sample_videos: Optional sample videos.
    """

    every_n_steps: int = 250
    num_batches: int = 4
    sigmas: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    seed: int = 1234
    sample_videos: SampleVideosConfig = field(default_factory=SampleVideosConfig)


@dataclass
class EMAConfig:
    """Exponential moving average of the trainable weights (stored in checkpoints, exported beside).

    Attributes:
        enabled: Keep an EMA.
        decay: EMA decay per optimizer step.
    """

    enabled: bool = False
    decay: float = 0.999


@dataclass
class CheckpointConfig:
    """Resumable Lightning checkpoints in ``${run_dir}/checkpoints`` (``last.ckpt`` links the newest).

    Each has a ``.sha256.json`` beside it; a rerun resumes from the newest intact one
    (`t3.training.checkpoints`).

    Attributes:
        every_n_steps: Save every this many optimizer steps (and at the end).
        keep: Checkpoints kept (the newest); with 2 or more, a damaged newest one has a fallback.
    """

    every_n_steps: int = 250
    keep: int = 2


@dataclass
class ExportConfig:
    """The fine-tuned DiT written at the end of training to ``${run_dir}/export/<format>``.

    Attributes:
        formats: Any of ``diffusers`` and ``wan`` (original Wan key names).
        dtype: Cast floating weights to ``bf16``/``fp32`` before saving; None keeps the training dtype.
    """

    formats: list[str] = field(default_factory=lambda: ["diffusers", "wan"])
    dtype: str | None = None


@dataclass
class TrainerConfig:
    """Lightning ``Trainer`` arguments that runs change (the rest are fixed in `t3.training.train`).

    Attributes:
        accelerator: ``gpu`` or ``cpu``.
        devices: Devices per node (an int or ``auto``).
        num_nodes: Nodes.
        precision: ``bf16-mixed`` on GPU, ``32-true`` on CPU.
        max_steps: Optimizer steps.
        gradient_clip_val: Clip the global gradient norm to this (0 disables).
        log_every_n_steps: Logging interval in optimizer steps.
        deterministic: ``torch.use_deterministic_algorithms``.
    """

    accelerator: str = "gpu"
    devices: Any = "auto"
    num_nodes: int = 1
    precision: str = "bf16-mixed"
    max_steps: int = 5000
    gradient_clip_val: float = 1.0
    log_every_n_steps: int = 1
    deterministic: bool = False


@dataclass
class StrategyConfig:
    """How the model is spread over GPUs; chosen here, never by branches in model code.

    Attributes:
        name: ``auto`` (one device), ``ddp``, ``deepspeed`` or ``fsdp2`` (Lightning's ModelParallelStrategy).
        zero_stage: DeepSpeed ZeRO stage (1, 2 or 3).
        offload_optimizer: DeepSpeed: optimizer states (and fp32 master weights) in CPU memory.
        offload_parameters: DeepSpeed ZeRO-3: parameters in CPU memory.
        bucket_size: DeepSpeed all-gather / reduce bucket size in elements.
        process_group_backend: ``nccl``/``gloo``; None picks by device.
    """

    name: str = "auto"
    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_parameters: bool = False
    bucket_size: int = 200_000_000
    process_group_backend: str | None = None


@dataclass
class ParallelConfig:
    """Parallelism inside one sample (`t3.parallel`); data parallelism, ZeRO and FSDP2 are ``strategy``.

    Attributes:
        sequence_parallel_size: GPUs that share each video's tokens (an SP group of consecutive ranks).
            The world size must be a multiple of it; the ``world / sequence_parallel_size`` SP groups are
            the data-parallel replicas (global batch = micro x data-parallel size x accumulation).
        align: Where shards are cut: ``tokens`` (even shards) or ``frames`` (on frame boundaries, so
            whole-frame layers exchange nothing; needs ``sequence_parallel_size`` <= latent frames).
        policy: Per-layer work assignment (`t3.parallel.assignment`): ``auto`` picks the fewest moved
            rows within ``max_imbalance``; ``owner``, ``resident``, ``heads`` force one.
        max_imbalance: Largest accepted per-rank attention work over the mean, minus one, under ``auto``.
    """

    sequence_parallel_size: int = 1
    align: str = "tokens"
    policy: str = "auto"
    max_imbalance: float = 0.05


@dataclass
class LoggerConfig:
    """Metric loggers. CSV always works offline; wandb honours ``WANDB_MODE`` (e.g. ``offline``).

    Attributes:
        csv: Write ``${run_dir}/csv/metrics.csv``.
        wandb: Log to Weights & Biases (the run id is kept in the run dir, so a resumed run continues).
        project: wandb project.
        entity: wandb entity (team); None for the default.
        mode: wandb mode: ``online``, ``offline`` or ``disabled``.
        name: wandb run name; None: ``experiment_name``, and in a sweep ``<experiment_name>/<the job's
            overrides>`` (its folder name), so that every job of a study has a name of its own.
        group: wandb group; None: in a sweep the study (``experiment_name``), else none.
    """

    csv: bool = True
    wandb: bool = False
    project: str = "t3"
    entity: str | None = None
    mode: str = "online"
    name: str | None = None
    group: str | None = None


@dataclass
class PathsConfig:
    """Where things go.

    Attributes:
        root_dir: Base folder (default: the working directory).
        output_dir: Run directories live here.
        cache_dir: Prepared data and other caches.
    """

    root_dir: str = "."
    output_dir: str = "${paths.root_dir}/outputs"
    cache_dir: str = "${paths.root_dir}/.cache/t3"


@dataclass
class TrainConfig:
    """The whole training config (``conf/train.yaml``).

    Attributes:
        entry: What ``train.py`` runs with the validated config, as ``package.module:function``: training
            (`TRAIN_ENTRY`) unless the experiment names another (the CPU demo: ``t3.demo.pipeline:main``).
            The function takes the config and returns the value a Hydra sweeper minimises, or None.
        experiment_name: Names the run directory; experiments set it to their file name.
        run_dir: Everything of a run: checkpoints, logs, exports. Deterministic, so rerunning the same
            command resumes (see ``resume``).
        seed: Global seed (data order, noise, initialisation).
        resume: Continue from the newest intact checkpoint of ``run_dir`` when there is one; false moves
            the previous run's outputs to ``run_dir/previous_runs/<time>/`` and starts over.
        resume_changed_config: Resume a checkpoint trained with other settings (a different training
            digest, `t3.training.checkpoints.training_digest`) instead of refusing.
        dry_run: Build everything on the meta device, print the plan (grid, layer plans, MACs, memory,
            bytes each GPU sends per step under sequence parallelism, throughput) and exit; needs no weights.
        dry_run_tflops: Sustained dense bf16 TFLOP/s per GPU assumed by the dry run's throughput estimate.
        dry_run_num_gpus: GPU count for the dry run's memory and throughput estimate (None: from
            ``trainer.devices * trainer.num_nodes``, 8 when that is ``auto``).
        dry_run_gpu_memory_gib: Memory of one GPU that the dry run's estimate is checked against
            (80: an 80 GB A100/H100).
        tags: Free-form tags for the logger.
        progress_every_n_steps: Optimizer steps between progress lines (step, loss, lr, s/step, ETA) on
            the console and in ``${run_dir}/train.log``; a progress bar is shown as well on a terminal.
        max_consecutive_bad_steps: Stop (with an error) after this many micro-batches in a row with a
            non-finite loss; isolated ones are skipped and counted in ``train/num_skipped_nonfinite``.
        demo: Settings of the CPU demo (``conf/experiment/demo.yaml``, `t3.demo.settings`); None for
            every other experiment.
    """

    entry: str = TRAIN_ENTRY
    experiment_name: str = "default"
    run_dir: str = "${paths.output_dir}/${experiment_name}"
    seed: int = 42
    resume: bool = True
    resume_changed_config: bool = False
    dry_run: bool = False
    dry_run_tflops: float = 400.0
    dry_run_num_gpus: int | None = None
    dry_run_gpu_memory_gib: float = 80.0
    tags: list[str] = field(default_factory=list)
    progress_every_n_steps: int = 10
    max_consecutive_bad_steps: int = 5
    model: ModelConfig = field(default_factory=ModelConfig)
    t3: Any = MISSING
    data: DataConfig = field(default_factory=DataConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    demo: DemoConfig | None = None


def register_configs() -> None:
    """Store `TrainConfig` in Hydra's ConfigStore as ``train_schema`` (idempotent)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="train_schema", node=TrainConfig)

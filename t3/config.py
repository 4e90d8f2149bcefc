"""Training config schemas and the start-up checks that reject impossible runs in plain words.

The dataclasses below are the schema of ``conf/train.yaml``: `register_configs` stores `TrainConfig` in
Hydra's ConfigStore as ``train_schema``, which ``conf/train.yaml`` lists first in its defaults, so every
group file (``model/``, ``data/``, ``strategy/`` ...) is merged onto a typed node. A misspelt key or a
value of the wrong type then fails at composition, naming the key.

Types are not enough: frames must be ``4k + 1``, heights a multiple of the model's pixel multiple, the
T3 schedule must fit the token grid, the global batch must split into micro-batches over the GPUs.
`validate` checks all of it from the config alone (no weights, no model), in about a second, and raises
`ConfigError` with a one-line message that names the key, the value and the accepted range. It returns
the derived `RunFacts` (grid, world size, gradient accumulation) that the rest of training uses.

Hydra itself is imported lazily (only `register_configs` and `instantiate` need it), so the dataclasses
can be imported by code that must not depend on Hydra.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import inspect
import os
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

from t3.demo.settings import DemoConfig

__all__ = [
    "TRAINABLE",
    "BatchConfig",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "EMAConfig",
    "ExportConfig",
    "FinetuneConfig",
    "LoggerConfig",
    "LoraConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "OptimConfig",
    "PathsConfig",
    "RunFacts",
    "SampleVideosConfig",
    "StrategyConfig",
    "TrainConfig",
    "TrainerConfig",
    "TRAIN_ENTRY",
    "ValidationConfig",
    "check_field_types",
    "entry_function",
    "register_configs",
    "resolve_world_size",
    "validate",
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
_ENTRY_FORM = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


class ConfigError(ValueError):
    """An impossible config value; the message is one line naming the key and the accepted range."""


# --- schemas ----------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Which model, and where its weights are (local paths only; nothing is downloaded).

    Attributes:
        preset: A `t3.models.preset_names` entry (architecture, VAE geometry).
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
            throughput) and exit; needs no weights.
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
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    demo: DemoConfig | None = None


def register_configs() -> None:
    """Store `TrainConfig` in Hydra's ConfigStore as ``train_schema`` (idempotent)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


# --- validation -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunFacts:
    """What follows from a valid config, computed once at start-up.

    Attributes:
        preset: Model preset name.
        latent_shape: Latent ``(C, T', H', W')`` of one sample.
        grid: Post-patch token grid ``(T, H, W)``.
        num_layers: DiT blocks.
        world_size: Processes (GPUs) that train together.
        accumulate: Micro-batches per optimizer step on each process.
        schedule: The T3 `Schedule`.
    """

    preset: str
    latent_shape: tuple[int, int, int, int]
    grid: tuple[int, int, int]
    num_layers: int
    world_size: int
    accumulate: int
    schedule: Any


def _fail(key: str, value: Any, accepted: str) -> ConfigError:
    return ConfigError(f"{key}={value!r}: {accepted}")


def _check_range(
    cfg: DictConfig,
    key: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    value = OmegaConf.select(cfg, key)
    bad = (low is not None and (value <= low if low_open else value < low)) or (
        high is not None and (value >= high if high_open else value > high)
    )
    if bad:
        lo = "" if low is None else f"{low} {'<' if low_open else '<='} "
        hi = "" if high is None else f" {'<' if high_open else '<='} {high}"
        raise _fail(key, value, f"must satisfy {lo}{key.rsplit('.', 1)[-1]}{hi}")


def _check_choice(cfg: DictConfig, key: str, choices: tuple[str, ...]) -> None:
    value = OmegaConf.select(cfg, key)
    if value not in choices:
        raise _fail(key, value, f"must be one of {list(choices)}")


def _require(cfg: DictConfig, key: str, what: str) -> Any:
    """The value at ``key``; a one-line error explaining ``what`` it should be if it is missing or null."""
    if OmegaConf.is_missing(cfg, key) or OmegaConf.select(cfg, key) is None:
        raise ConfigError(f"{key} is required: {what}")
    return OmegaConf.select(cfg, key)


def _check_schema_keys(node: DictConfig, prefix: str = "") -> None:
    """Every key of a schema node must be a field of its dataclass.

    Composition refuses unknown keys, but Hydra's ``+key=value`` (which its own error message suggests)
    opens the node and adds the key anyway: ``+optim.lrr=1e-4`` would then be accepted and ignored.
    """
    schema = OmegaConf.get_type(node)
    if dataclasses.is_dataclass(schema):
        fields = [f.name for f in dataclasses.fields(schema)]
        for key in node:
            if key not in fields and not (key == "hydra" and not prefix):  # Hydra's own node, if composed in
                near = difflib.get_close_matches(str(key), fields, n=1)
                hint = f" (did you mean {prefix}{near[0]}?)" if near else ""
                raise ConfigError(f"{prefix}{key}: unknown key{hint}; accepted: {sorted(fields)}")
    for key in node:
        child = node._get_node(key)  # no interpolation is resolved here
        if (
            isinstance(child, DictConfig)
            and not (key == "hydra" and not prefix)
            and not child._is_none()
            and not child._is_missing()
        ):
            _check_schema_keys(child, f"{prefix}{key}.")


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _type_problem(value: Any, hint: Any) -> str | None:
    """What ``value`` must be to match the type hint ``hint`` (None if it does); unknown hints pass."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if value is None and len(options) < len(args):
            return None
        problems = [_type_problem(value, option) for option in options]
        if None in problems:
            return None
        return " or ".join(p.removeprefix("must be ") for p in problems) + (
            " or null" if len(options) < len(args) else ""
        )
    if origin in (tuple, list) and args and args[0] in _TYPE_WORDS:
        if isinstance(value, (list, tuple)) and all(_type_problem(v, args[0]) is None for v in value):
            return None
        return f"a list of {_TYPE_WORDS[args[0]].removeprefix('an ').removeprefix('a ')}s"
    if hint not in _TYPE_WORDS:
        return None
    ok = (
        isinstance(value, bool)
        if hint is bool
        else isinstance(value, (int, float) if hint is float else hint) and not isinstance(value, bool)
    )
    return None if ok else _TYPE_WORDS[hint]


def check_field_types(settings: Any, prefix: str, names: dict[str, str] | None = None) -> None:
    """Check every field of a dataclass instance against its type hint (bool, int, float, str, optional,
    lists of those), so that a value of the wrong type fails here, naming its key, and not inside a model.

    Args:
        settings: A dataclass instance built from a config node.
        prefix: The node's key (``generation``): a field is reported as ``<prefix>.<field>``.
        names: Config keys of fields that come from elsewhere (``{"backend": "model.attention_backend"}``).

    Raises:
        ConfigError: ``<key>=<value>: must be <type>``.
    """
    for name, hint in typing.get_type_hints(type(settings)).items():
        value = getattr(settings, name)
        problem = _type_problem(value, hint)
        if problem is not None:
            key = (names or {}).get(name, f"{prefix}.{name}")
            shown = list(value) if isinstance(value, tuple) else value
            raise _fail(key, shown, f"must be {problem}")


def resolve_world_size(trainer: DictConfig | TrainerConfig) -> int:
    """Processes that will train together, from ``trainer.devices`` and ``trainer.num_nodes``.

    ``auto`` (or -1) means every visible GPU on ``gpu`` and one process on ``cpu``.
    """
    devices = trainer.devices
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    if devices in ("auto", -1):
        if trainer.accelerator == "cpu":
            devices = 1
        else:
            import torch

            devices = max(torch.cuda.device_count(), 1)
    elif not isinstance(devices, int) or devices < 1:
        if OmegaConf.is_list(devices) or isinstance(devices, list | tuple):
            devices = len(devices)
        else:
            raise _fail("trainer.devices", devices, "must be a positive int, 'auto' or -1")
    return int(devices) * int(trainer.num_nodes)


def _check_target_kwargs(cfg: DictConfig, key: str, *, require_values: bool = True) -> None:
    """Bind a ``_target_`` config's keys to the target's signature: a misspelt reader argument fails now.

    With ``require_values``, a mandatory value left as ``???`` (a data path) fails now too.
    """
    node = OmegaConf.select(cfg, key)
    if node is None:
        return
    if not OmegaConf.is_dict(node) or "_target_" not in node:
        raise _fail(key, node, "must be a config with a _target_ (a dataset factory)")
    from hydra.utils import get_method

    try:
        target = get_method(node._target_)
    except Exception as err:  # Hydra wraps import errors of any kind
        raise ConfigError(f"{key}._target_={node._target_!r}: cannot be imported ({err})") from None
    names = [str(k) for k in node if not str(k).startswith("_")]
    if require_values:
        for name in names:
            if OmegaConf.is_missing(node, name):
                raise ConfigError(f"{key}.{name} is required: set it on the command line ({key}.{name}=...)")
    signature = inspect.signature(target)
    if any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        return
    unknown = [k for k in names if k not in signature.parameters]
    if unknown:
        raise ConfigError(
            f"{key}.{unknown[0]}: unknown argument of {node._target_}; accepted: {sorted(signature.parameters)}"
        )


def _check_entry(cfg: DictConfig) -> None:
    entry = cfg.entry
    if not _ENTRY_FORM.fullmatch(entry):
        raise _fail("entry", entry, f"must be 'package.module:function' (training: {TRAIN_ENTRY!r})")
    module = entry.split(":")[0]
    try:
        found = importlib.util.find_spec(module) is not None  # imports its packages, not the module
    except ModuleNotFoundError:  # a package on the way is missing
        found = False
    if not found:
        raise _fail("entry", entry, f"no module {module!r} to import (training: {TRAIN_ENTRY!r})")


def entry_function(entry: str) -> Callable[[DictConfig], Any]:
    """The function an ``entry`` (checked by `validate`) names, imported.

    Raises:
        ConfigError: The module has no such function.
    """
    module_name, name = entry.split(":")
    function = getattr(importlib.import_module(module_name), name, None)
    if not callable(function):
        raise _fail("entry", entry, f"{module_name} has no function {name!r}")
    return function


def validate(cfg: DictConfig, *, world_size: int | None = None) -> RunFacts:
    """Check a composed training config before anything heavy is built.

    Args:
        cfg: The composed config (``conf/train.yaml`` and overrides).
        world_size: Processes that train together; None resolves it from ``trainer`` (or, for a dry run,
            from ``dry_run_num_gpus``).

    Returns:
        The derived `RunFacts`.

    Raises:
        ConfigError: One line naming the offending key, its value and what is accepted.
    """
    from t3.diffusion import LOSS_WEIGHTINGS, TIMESTEP_SAMPLERS
    from t3.models.presets import get_spec, preset_names

    _check_schema_keys(cfg)
    _check_entry(cfg)
    # A missing mandatory value anywhere (``???``) would otherwise surface much later, mid-build.
    for key in ("model.preset", "data.height", "data.width", "data.num_frames", "data.source", "t3"):
        _require(cfg, key, "set it in the experiment or on the command line")

    # Model and video size.
    _check_choice(cfg, "model.preset", tuple(preset_names()))
    spec = get_spec(cfg.model.preset)
    frames, height, width = cfg.data.num_frames, cfg.data.height, cfg.data.width
    fm, pm = spec.frame_multiple, spec.pixel_multiple
    if frames < 1 or (frames - 1) % fm:
        k = max((frames - 1) // fm, 0)
        raise _fail(
            "data.num_frames",
            frames,
            f"must be {fm}k+1 for {spec.name} (e.g. {fm * k + 1} or {fm * (k + 1) + 1})",
        )
    for key, value in (("data.height", height), ("data.width", width)):
        if value < pm or value % pm:
            lower = max(value // pm * pm, pm)
            raise _fail(
                key,
                value,
                f"must be a positive multiple of {pm} for {spec.name} (e.g. {lower} or {lower + pm})",
            )
    _check_choice(cfg, "data.source", DATA_SOURCES)
    _check_range(cfg, "data.num_workers", low=0)
    if cfg.data.max_skipped_fraction is not None:
        _check_range(cfg, "data.max_skipped_fraction", low=0, high=1)
    # Data paths are not needed for a dry run; reader arguments are checked either way.
    for key in ("data.prepare", "data.train", "data.val"):
        _check_target_kwargs(cfg, key, require_values=not cfg.dry_run)

    latent_shape = spec.latent_shape(frames, height, width)
    try:
        grid = spec.video_token_grid(frames, height, width)
    except ValueError as err:  # beyond the model's RoPE table: diffusers would fail mid-forward
        latent = latent_shape[1:]
        axis = max(range(3), key=lambda i: latent[i] // spec.patch_size[i])
        key = ("data.num_frames", "data.height", "data.width")[axis]
        raise _fail(key, (frames, height, width)[axis], str(err)) from None
    num_layers = int(spec.dit_config["num_layers"])

    # The T3 schedule must fit the token grid of this video size on every layer.
    schedule = _build_schedule(cfg)
    try:
        schedule.plans(grid, num_layers)
    except ValueError as err:
        raise ConfigError(
            f"t3={schedule.name!r} does not fit {height}x{width}x{frames} (token grid {grid}) on "
            f"{spec.name}: {err}"
        ) from None

    # The data's allowed sizes (resolution buckets) fit the model and the schedule.
    for key in ("data.train", "data.val"):
        _check_data_sizes(cfg, key, spec, schedule, num_layers)

    # What is trained.
    _check_choice(cfg, "finetune.trainable", TRAINABLE)
    if cfg.finetune.trainable == "lora":
        _check_range(cfg, "finetune.lora.rank", low=1)
        _check_range(cfg, "finetune.lora.alpha", low=0, low_open=True)
        _check_range(cfg, "finetune.lora.dropout", low=0, high=1, high_open=True)
        if not cfg.finetune.lora.target_modules:
            raise _fail("finetune.lora.target_modules", [], "must name at least one module (e.g. to_q)")
    _check_choice(cfg, "model.attention_backend", ("auto", "sdpa", "flash"))
    if OmegaConf.select(cfg, "model.attention_tokens_per_call") is not None:
        _check_range(cfg, "model.attention_tokens_per_call", low=1)

    # Optimisation.
    _check_range(cfg, "optim.lr", low=0, low_open=True)
    _check_range(cfg, "optim.weight_decay", low=0)
    _check_range(cfg, "optim.eps", low=0, low_open=True)
    _check_range(cfg, "optim.warmup_steps", low=0)
    _check_choice(cfg, "optim.schedule", LR_SCHEDULES)
    _check_range(cfg, "optim.min_lr_ratio", low=0, high=1)
    if len(cfg.optim.betas) != 2 or not all(0 <= b < 1 for b in cfg.optim.betas):
        raise _fail("optim.betas", list(cfg.optim.betas), "must be two numbers in [0, 1)")
    if cfg.optim.decay_steps is not None:
        _check_range(cfg, "optim.decay_steps", low=1)
    _check_choice(cfg, "objective.timestep_sampler", TIMESTEP_SAMPLERS)
    _check_choice(cfg, "objective.loss_weighting", LOSS_WEIGHTINGS)
    _check_range(cfg, "objective.flow_shift", low=0, low_open=True)
    _check_range(cfg, "objective.logit_std", low=0, low_open=True)
    _check_range(cfg, "objective.num_train_timesteps", low=1)

    # Trainer and parallelism.
    _check_choice(cfg, "trainer.accelerator", ACCELERATORS)
    _check_choice(cfg, "trainer.precision", PRECISIONS)
    _check_range(cfg, "trainer.max_steps", low=1)
    _check_range(cfg, "trainer.num_nodes", low=1)
    _check_range(cfg, "trainer.gradient_clip_val", low=0)
    _check_range(cfg, "trainer.log_every_n_steps", low=1)
    _check_choice(cfg, "strategy.name", STRATEGIES)
    strategy = cfg.strategy
    on_cpu = cfg.trainer.accelerator == "cpu"
    if on_cpu and cfg.trainer.precision != "32-true":
        raise _fail(
            "trainer.precision", cfg.trainer.precision, "must be '32-true' on the CPU (use trainer=cpu)"
        )
    if strategy.name == "deepspeed":
        _check_range(cfg, "strategy.zero_stage", low=1, high=3)
        if strategy.offload_parameters and strategy.zero_stage != 3:
            raise _fail(
                "strategy.offload_parameters",
                True,
                f"needs strategy.zero_stage=3 (got {strategy.zero_stage})",
            )
        if on_cpu and (strategy.offload_optimizer or strategy.offload_parameters):
            raise _fail(
                "strategy.offload_optimizer", True, "offloading to the CPU needs a GPU run (trainer=gpu)"
            )
    _check_range(cfg, "strategy.bucket_size", low=1)
    sharded_params = strategy.name == "fsdp2" or (strategy.name == "deepspeed" and strategy.zero_stage == 3)
    if cfg.ema.enabled:
        _check_range(cfg, "ema.decay", low=0, high=1, low_open=True, high_open=True)
        if sharded_params:
            raise _fail(
                "ema.enabled",
                True,
                f"the EMA needs whole parameters on every rank; use ddp or deepspeed ZeRO-1/2 (strategy={strategy.name}"
                + (f", zero_stage={strategy.zero_stage})" if strategy.name == "deepspeed" else ")"),
            )

    # Batch: the global batch is fixed; accumulation absorbs the GPU count.
    if world_size is None:
        world_size = _dry_run_world_size(cfg) if cfg.dry_run else resolve_world_size(cfg.trainer)
    if strategy.name == "auto" and world_size > 1:
        raise _fail(
            "strategy", "auto", f"is for one device; {world_size} processes need ddp, deepspeed or fsdp2"
        )
    _check_range(cfg, "batch.global_size", low=1)
    _check_range(cfg, "batch.micro_size", low=1)
    per_step = cfg.batch.micro_size * world_size
    if cfg.batch.global_size % per_step:
        raise _fail(
            "batch.global_size",
            cfg.batch.global_size,
            f"must be a multiple of batch.micro_size x world size = {cfg.batch.micro_size} x {world_size} = {per_step}",
        )
    accumulate = cfg.batch.global_size // per_step

    # Validation, checkpoints, export, logging.
    _check_range(cfg, "validation.every_n_steps", low=0)
    _check_range(cfg, "validation.num_batches", low=1)
    if not cfg.validation.sigmas or not all(0 <= s <= 1 for s in cfg.validation.sigmas):
        raise _fail(
            "validation.sigmas", list(cfg.validation.sigmas), "must be a non-empty list of numbers in [0, 1]"
        )
    _check_range(cfg, "checkpoint.every_n_steps", low=1)
    _check_range(cfg, "checkpoint.keep", low=1)
    _check_range(cfg, "max_consecutive_bad_steps", low=1)
    _check_range(cfg, "progress_every_n_steps", low=1)
    for fmt in cfg.export.formats:
        if fmt not in EXPORT_FORMATS:
            raise _fail(
                "export.formats", list(cfg.export.formats), f"entries must be in {list(EXPORT_FORMATS)}"
            )
    if cfg.export.dtype is not None:
        _check_choice(cfg, "export.dtype", ("bf16", "fp32"))
    _check_choice(cfg, "logger.mode", ("online", "offline", "disabled"))

    # Weights, data and the machine: checked for a real run only; the dry run works from the architecture.
    if not cfg.dry_run:
        _check_weights(cfg)
        _check_data_paths(cfg, spec)
        # Last: the config is right, this machine cannot run it (Lightning's own error would come only
        # after the strategy, the model and the data were built).
        if cfg.trainer.accelerator in ("gpu", "cuda"):
            import torch

            if not torch.cuda.is_available():
                raise _fail(
                    "trainer.accelerator",
                    cfg.trainer.accelerator,
                    "no CUDA GPU is visible on this machine; run on a GPU node, or use trainer=cpu here",
                )

    return RunFacts(
        preset=spec.name,
        latent_shape=latent_shape,
        grid=grid,
        num_layers=num_layers,
        world_size=world_size,
        accumulate=accumulate,
        schedule=schedule,
    )


def _dry_run_world_size(cfg: DictConfig) -> int:
    _check_range(cfg, "dry_run_gpu_memory_gib", low=0, low_open=True)
    if cfg.dry_run_num_gpus is not None:
        _check_range(cfg, "dry_run_num_gpus", low=1)
        return int(cfg.dry_run_num_gpus)
    devices = cfg.trainer.devices
    if isinstance(devices, int) and devices > 0:
        return devices * int(cfg.trainer.num_nodes)
    return 8 * int(cfg.trainer.num_nodes)


def _build_schedule(cfg: DictConfig) -> Any:
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    if cfg.t3.get("from_checkpoint"):
        raise ConfigError(
            "t3=from_checkpoint: eval.py's default (the schedule a checkpoint was trained with); "
            "training needs a schedule of its own, e.g. t3=wan21_windows or t3=dense"
        )
    try:
        return instantiate(cfg.t3)
    except InstantiationException as err:
        cause = err.__cause__ or err
        raise ConfigError(f"t3: cannot build the schedule: {str(cause).splitlines()[0]}") from None


def _check_data_sizes(cfg: DictConfig, key: str, spec: Any, schedule: Any, num_layers: int) -> None:
    """The ``sizes`` a latent reader allows (resolution buckets) must fit the model and the T3 schedule."""
    node = OmegaConf.select(cfg, key)
    if not OmegaConf.is_dict(node) or OmegaConf.select(node, "sizes") is None:
        return
    from t3.data.shards import allowed_latent_shapes

    for size in node.sizes:
        try:
            (shape,) = allowed_latent_shapes(spec, [list(size)])
            grid = spec.token_grid(shape)
            schedule.plans(grid, num_layers)
        except ValueError as err:
            raise _fail(f"{key}.sizes", OmegaConf.to_object(node.sizes), f"{list(size)}: {err}") from None


def _check_data_paths(cfg: DictConfig, spec: Any) -> None:
    """The data a run reads must be there at start-up: one line per missing path, before anything is built.

    ``urls_or_dir`` of the readers (a shard folder, file, brace pattern or list) and ``video_list`` of a
    preparation step; a reader fed by ``data.prepare`` is checked after the preparation, by the reader.
    Shards whose ``manifest.json`` gives a latent shape outside the reader's ``sizes`` are refused too: the
    reader would skip every sample.
    """
    from t3.data.shards import allowed_latent_shapes, check_shard_source, read_manifest

    prepare = OmegaConf.select(cfg, "data.prepare")
    video_list = OmegaConf.select(prepare, "video_list") if OmegaConf.is_dict(prepare) else None
    if isinstance(video_list, str) and not os.path.isfile(video_list):
        raise _fail("data.prepare.video_list", video_list, "no such file")
    prepared = OmegaConf.select(prepare, "out_dir") if OmegaConf.is_dict(prepare) else None
    for key in ("data.train", "data.val"):
        node = OmegaConf.select(cfg, key)
        if not OmegaConf.is_dict(node) or "urls_or_dir" not in node:
            continue
        source = node.urls_or_dir
        if source is None or (prepared is not None and source == prepared):
            continue
        source = OmegaConf.to_object(source) if OmegaConf.is_config(source) else source
        try:
            check_shard_source(source)
        except FileNotFoundError as err:
            raise _fail(f"{key}.urls_or_dir", source, str(err)) from None
        shape = read_manifest(source).get("latent_shape")
        if shape is None or OmegaConf.select(node, "sizes") is None:
            continue
        allowed = allowed_latent_shapes(spec, OmegaConf.to_object(node.sizes))
        if list(shape) not in allowed:
            st, sh, sw = spec.vae_stride
            made_at = f"{(shape[1] - 1) * st + 1}x{shape[2] * sh}x{shape[3] * sw}"
            raise _fail(
                f"{key}.urls_or_dir",
                source,
                f"its manifest.json gives latents {list(shape)} (frames x height x width {made_at}), but "
                f"{key}.sizes allows {allowed}; set data.num_frames/height/width to the shards' size, or "
                f"list it in {key}.sizes",
            )


def _check_weights(cfg: DictConfig) -> None:
    model = cfg.model
    # init_from, else dit_path, else random_init (t3.training.finetune.build_dit): a path that is set is used,
    # so it must exist even where random_init would apply without it.
    if model.init_from is not None:
        source_key = "model.init_from"
    elif model.dit_path is not None:
        source_key = "model.dit_path"
    elif model.random_init:
        source_key = None
    else:
        source_key = "model.dit_path"
        _require(
            cfg,
            source_key,
            f"a local {model.preset} DiT (diffusers 'transformer' folder or Wan .safetensors); "
            "or model.init_from=<export folder>, or model.random_init=true for a random-weight debug run",
        )
    if source_key is not None:
        path = OmegaConf.select(cfg, source_key)
        if not os.path.exists(path):
            hint = (
                " (run the stage-1 experiment first: its export is where stage 2 starts)"
                if source_key == "model.init_from"
                else ""
            )
            raise ConfigError(f"{source_key}={path!r}: no such file or folder{hint}")
    # The tiny test model brings random encoders; real ones come from local folders.
    needs_encoders = (
        cfg.validation.sample_videos.enabled
        or cfg.data.source == "raw_videos"
        or cfg.data.source == "synthetic"
    )
    if needs_encoders and model.preset != "tiny":
        why = (
            f"data.source={cfg.data.source}"
            if cfg.data.source != "latent_shards"
            else "validation.sample_videos"
        )
        for key in ("model.vae_path", "model.text_encoder_path"):
            value = _require(cfg, key, f"needed by {why} (encoding videos or prompts)")
            if not os.path.exists(value):
                raise ConfigError(f"{key}={value!r}: no such folder")

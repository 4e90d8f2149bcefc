"""The start-up checks that reject impossible training runs in plain words.

Types are not enough: frames must be ``4k + 1``, heights a multiple of the model's pixel multiple, the
T3 schedule must fit the token grid, the global batch must split into micro-batches over the GPUs.
`validate` checks all of it from the config alone (no weights, no model), in about a second, and raises
`ConfigError` with a one-line message that names the key, the value and the accepted range. It returns
the derived `RunFacts` (grid, world size, gradient accumulation) that the rest of training uses. Each
group of checks is a named function below, called by `validate` in order.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from t3.config.checks import (
    ConfigError,
    check_choice,
    check_range,
    check_schema_keys,
    check_target_kwargs,
    fail,
    require,
)
from t3.config.train_schema import (
    ACCELERATORS,
    DATA_SOURCES,
    EXPORT_FORMATS,
    LR_SCHEDULES,
    PRECISIONS,
    STRATEGIES,
    TRAIN_ENTRY,
    TRAINABLE,
    TrainerConfig,
)

__all__ = ["RunFacts", "entry_function", "resolve_world_size", "validate"]

logger = logging.getLogger(__name__)

_VIDEO_SIZE_KEYS = ("data.num_frames", "data.height", "data.width")
_ENTRY_FORM = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


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
        sequence_parallel_size: Processes sharing each sample's tokens (``parallel.sequence_parallel_size``).
    """

    preset: str
    latent_shape: tuple[int, int, int, int]
    grid: tuple[int, int, int]
    num_layers: int
    world_size: int
    accumulate: int
    schedule: Any
    sequence_parallel_size: int = 1

    @property
    def data_parallel_size(self) -> int:
        """Data-parallel replicas: the SP groups, each reading its own samples."""
        return self.world_size // self.sequence_parallel_size


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
            raise fail("trainer.devices", devices, "must be a positive int, 'auto' or -1")
    return int(devices) * int(trainer.num_nodes)


def _check_entry(cfg: DictConfig) -> None:
    entry = cfg.entry
    if not _ENTRY_FORM.fullmatch(entry):
        raise fail("entry", entry, f"must be 'package.module:function' (training: {TRAIN_ENTRY!r})")
    module = entry.split(":")[0]
    try:
        found = importlib.util.find_spec(module) is not None  # imports its packages, not the module
    except ModuleNotFoundError:  # a package on the way is missing
        found = False
    if not found:
        raise fail("entry", entry, f"no module {module!r} to import (training: {TRAIN_ENTRY!r})")


def entry_function(entry: str) -> Callable[[DictConfig], Any]:
    """The function an ``entry`` (checked by `validate`) names, imported.

    Raises:
        ConfigError: The module has no such function.
    """
    module_name, name = entry.split(":")
    function = getattr(importlib.import_module(module_name), name, None)
    if not callable(function):
        raise fail("entry", entry, f"{module_name} has no function {name!r}")
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
    check_schema_keys(cfg)
    _check_entry(cfg)
    # A missing mandatory value anywhere (``???``) would otherwise surface much later, mid-build.
    for key in ("model.preset", "data.height", "data.width", "data.num_frames", "data.source", "t3"):
        require(cfg, key, "set it in the experiment or on the command line")

    spec = _check_video_size(cfg)
    _check_data_settings(cfg)
    latent_shape, grid = _token_grid(cfg, spec)
    num_layers = int(spec.dit_config["num_layers"])
    schedule = _check_schedule(cfg, spec, grid, num_layers)
    # The data's allowed sizes (resolution buckets) fit the model and the schedule.
    for key in ("data.train", "data.val"):
        _check_data_sizes(cfg, key, spec, schedule, num_layers)
    _check_finetune(cfg)
    _check_optimisation(cfg)
    _check_parallelism(cfg)
    if world_size is None:
        world_size = _dry_run_world_size(cfg) if cfg.dry_run else resolve_world_size(cfg.trainer)
    sequence_parallel = _check_sequence_parallel(cfg, grid, world_size)
    accumulate = _check_batch(cfg, world_size, sequence_parallel)
    _check_outputs(cfg)

    # Weights, data and the machine: checked for a real run only; the dry run works from the architecture.
    if not cfg.dry_run:
        _check_weights(cfg)
        _check_data_paths(cfg, spec)
        # Last: the config is right, this machine cannot run it (Lightning's own error would come only
        # after the strategy, the model and the data were built).
        _check_machine(cfg)

    return RunFacts(
        preset=spec.name,
        latent_shape=latent_shape,
        grid=grid,
        num_layers=num_layers,
        world_size=world_size,
        accumulate=accumulate,
        schedule=schedule,
        sequence_parallel_size=sequence_parallel,
    )


def _check_video_size(cfg: DictConfig) -> Any:
    """The model preset exists and the video size is legal for it; returns the preset's `ModelSpec`."""
    from t3.models.presets import get_spec, preset_names

    check_choice(cfg, "model.preset", tuple(preset_names()))
    spec = get_spec(cfg.model.preset)
    try:
        spec.check_video_size(cfg.data.num_frames, cfg.data.height, cfg.data.width, names=_VIDEO_SIZE_KEYS)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return spec


def _check_data_settings(cfg: DictConfig) -> None:
    check_choice(cfg, "data.source", DATA_SOURCES)
    check_range(cfg, "data.num_workers", low=0)
    if cfg.data.max_skipped_fraction is not None:
        check_range(cfg, "data.max_skipped_fraction", low=0, high=1)
    # Data paths are not needed for a dry run; reader arguments are checked either way.
    for key in ("data.prepare", "data.train", "data.val"):
        check_target_kwargs(cfg, key, require_values=not cfg.dry_run)


def _token_grid(cfg: DictConfig, spec: Any) -> tuple[tuple[int, int, int, int], tuple[int, int, int]]:
    """The latent shape and token grid of the video size (within the model's RoPE table)."""
    frames, height, width = cfg.data.num_frames, cfg.data.height, cfg.data.width
    try:  # beyond the model's RoPE table diffusers would fail mid-forward
        grid = spec.video_token_grid(frames, height, width, names=_VIDEO_SIZE_KEYS)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return spec.latent_shape(frames, height, width), grid


def _check_schedule(cfg: DictConfig, spec: Any, grid: tuple[int, int, int], num_layers: int) -> Any:
    """The T3 schedule builds, was made for this model, and fits the token grid of this video size on
    every layer; logs the padding it computes there. Returns the schedule."""
    schedule = _build_schedule(cfg)
    try:
        padding = spec.check_schedule(schedule, grid)
    except ValueError as err:
        raise ConfigError(
            f"t3={schedule.name!r} does not fit {cfg.data.height}x{cfg.data.width}x{cfg.data.num_frames} "
            f"(token grid {grid}) on {spec.name}: {err}"
        ) from None
    logger.info("T3 %s", padding)
    return schedule


def _check_finetune(cfg: DictConfig) -> None:
    """What is trained, and the attention backend it runs on."""
    check_choice(cfg, "finetune.trainable", TRAINABLE)
    if cfg.finetune.trainable == "lora":
        check_range(cfg, "finetune.lora.rank", low=1)
        check_range(cfg, "finetune.lora.alpha", low=0, low_open=True)
        check_range(cfg, "finetune.lora.dropout", low=0, high=1, high_open=True)
        if not cfg.finetune.lora.target_modules:
            raise fail("finetune.lora.target_modules", [], "must name at least one module (e.g. to_q)")
    check_choice(cfg, "model.attention_backend", ("auto", "sdpa", "flash"))
    if OmegaConf.select(cfg, "model.attention_tokens_per_call") is not None:
        check_range(cfg, "model.attention_tokens_per_call", low=1)


def _check_optimisation(cfg: DictConfig) -> None:
    """The optimizer, its learning-rate schedule and the flow-matching objective."""
    from t3.diffusion import LOSS_WEIGHTINGS, TIMESTEP_SAMPLERS

    check_range(cfg, "optim.lr", low=0, low_open=True)
    check_range(cfg, "optim.weight_decay", low=0)
    check_range(cfg, "optim.eps", low=0, low_open=True)
    check_range(cfg, "optim.warmup_steps", low=0)
    check_choice(cfg, "optim.schedule", LR_SCHEDULES)
    check_range(cfg, "optim.min_lr_ratio", low=0, high=1)
    if len(cfg.optim.betas) != 2 or not all(0 <= b < 1 for b in cfg.optim.betas):
        raise fail("optim.betas", list(cfg.optim.betas), "must be two numbers in [0, 1)")
    if cfg.optim.decay_steps is not None:
        check_range(cfg, "optim.decay_steps", low=1)
    check_choice(cfg, "objective.timestep_sampler", TIMESTEP_SAMPLERS)
    check_choice(cfg, "objective.loss_weighting", LOSS_WEIGHTINGS)
    check_range(cfg, "objective.flow_shift", low=0, low_open=True)
    check_range(cfg, "objective.logit_std", low=0, low_open=True)
    check_range(cfg, "objective.num_train_timesteps", low=1)


def _check_parallelism(cfg: DictConfig) -> None:
    """The trainer, the strategy, and the settings each strategy supports (offloading, the EMA)."""
    check_choice(cfg, "trainer.accelerator", ACCELERATORS)
    check_choice(cfg, "trainer.precision", PRECISIONS)
    check_range(cfg, "trainer.max_steps", low=1)
    check_range(cfg, "trainer.num_nodes", low=1)
    check_range(cfg, "trainer.gradient_clip_val", low=0)
    check_range(cfg, "trainer.log_every_n_steps", low=1)
    check_choice(cfg, "strategy.name", STRATEGIES)
    strategy = cfg.strategy
    on_cpu = cfg.trainer.accelerator == "cpu"
    if on_cpu and cfg.trainer.precision != "32-true":
        raise fail(
            "trainer.precision", cfg.trainer.precision, "must be '32-true' on the CPU (use trainer=cpu)"
        )
    if strategy.name == "deepspeed":
        check_range(cfg, "strategy.zero_stage", low=1, high=3)
        if strategy.offload_parameters and strategy.zero_stage != 3:
            raise fail(
                "strategy.offload_parameters",
                True,
                f"needs strategy.zero_stage=3 (got {strategy.zero_stage})",
            )
        if on_cpu and (strategy.offload_optimizer or strategy.offload_parameters):
            raise fail(
                "strategy.offload_optimizer", True, "offloading to the CPU needs a GPU run (trainer=gpu)"
            )
    check_range(cfg, "strategy.bucket_size", low=1)
    sharded_params = strategy.name == "fsdp2" or (strategy.name == "deepspeed" and strategy.zero_stage == 3)
    if cfg.ema.enabled:
        check_range(cfg, "ema.decay", low=0, high=1, low_open=True, high_open=True)
        if sharded_params:
            raise fail(
                "ema.enabled",
                True,
                f"the EMA needs whole parameters on every rank; use ddp or deepspeed ZeRO-1/2 (strategy={strategy.name}"
                + (f", zero_stage={strategy.zero_stage})" if strategy.name == "deepspeed" else ")"),
            )


def _check_sequence_parallel(cfg: DictConfig, grid: tuple[int, int, int], world_size: int) -> int:
    """The SP size tiles the world and can shard the token grid (`t3.parallel.settings`); returns it."""
    from t3.parallel.settings import ParallelSettingsError, check_parallel_settings

    check_range(cfg, "parallel.sequence_parallel_size", low=1)
    p = cfg.parallel
    try:
        check_parallel_settings(
            p.sequence_parallel_size, p.align, p.policy, p.max_imbalance, grid=grid, world_size=world_size
        )
    except ParallelSettingsError as error:
        raise ConfigError(str(error)) from None
    return int(p.sequence_parallel_size)


def _check_batch(cfg: DictConfig, world_size: int, sequence_parallel: int = 1) -> int:
    """The global batch is fixed; accumulation absorbs the GPU count. Returns the micro-batches per step.

    Under sequence parallelism the ranks of an SP group share samples: only ``world / sp`` data-parallel
    replicas divide the batch.
    """
    if cfg.strategy.name == "auto" and world_size > 1:
        raise fail(
            "strategy", "auto", f"is for one device; {world_size} processes need ddp, deepspeed or fsdp2"
        )
    check_range(cfg, "batch.global_size", low=1)
    check_range(cfg, "batch.micro_size", low=1)
    replicas = world_size // sequence_parallel
    per_step = cfg.batch.micro_size * replicas
    if cfg.batch.global_size % per_step:
        what = (
            f"world size = {cfg.batch.micro_size} x {world_size}"
            if sequence_parallel == 1
            else f"data-parallel size (world {world_size} / parallel.sequence_parallel_size "
            f"{sequence_parallel}) = {cfg.batch.micro_size} x {replicas}"
        )
        raise fail(
            "batch.global_size",
            cfg.batch.global_size,
            f"must be a multiple of batch.micro_size x {what} = {per_step}",
        )
    return cfg.batch.global_size // per_step


def _check_outputs(cfg: DictConfig) -> None:
    """Validation, checkpoints, export, logging."""
    check_range(cfg, "validation.every_n_steps", low=0)
    check_range(cfg, "validation.num_batches", low=1)
    if not cfg.validation.sigmas or not all(0 <= s <= 1 for s in cfg.validation.sigmas):
        raise fail(
            "validation.sigmas", list(cfg.validation.sigmas), "must be a non-empty list of numbers in [0, 1]"
        )
    check_range(cfg, "checkpoint.every_n_steps", low=1)
    check_range(cfg, "checkpoint.keep", low=1)
    check_range(cfg, "max_consecutive_bad_steps", low=1)
    check_range(cfg, "progress_every_n_steps", low=1)
    for fmt in cfg.export.formats:
        if fmt not in EXPORT_FORMATS:
            raise fail(
                "export.formats", list(cfg.export.formats), f"entries must be in {list(EXPORT_FORMATS)}"
            )
    if cfg.export.dtype is not None:
        check_choice(cfg, "export.dtype", ("bf16", "fp32"))
    check_choice(cfg, "logger.mode", ("online", "offline", "disabled"))


def _check_machine(cfg: DictConfig) -> None:
    """A GPU run needs a visible CUDA GPU."""
    if cfg.trainer.accelerator in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            raise fail(
                "trainer.accelerator",
                cfg.trainer.accelerator,
                "no CUDA GPU is visible on this machine; run on a GPU node, or use trainer=cpu here",
            )


def _dry_run_world_size(cfg: DictConfig) -> int:
    check_range(cfg, "dry_run_gpu_memory_gib", low=0, low_open=True)
    if cfg.dry_run_num_gpus is not None:
        check_range(cfg, "dry_run_num_gpus", low=1)
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
            raise fail(f"{key}.sizes", OmegaConf.to_object(node.sizes), f"{list(size)}: {err}") from None


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
        raise fail("data.prepare.video_list", video_list, "no such file")
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
            raise fail(f"{key}.urls_or_dir", source, str(err)) from None
        shape = read_manifest(source).get("latent_shape")
        if shape is None or OmegaConf.select(node, "sizes") is None:
            continue
        allowed = allowed_latent_shapes(spec, OmegaConf.to_object(node.sizes))
        if list(shape) not in allowed:
            frames, height, width = spec.video_size(shape)
            made_at = f"{frames}x{height}x{width}"
            raise fail(
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
        require(
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
            value = require(cfg, key, f"needed by {why} (encoding videos or prompts)")
            if not os.path.exists(value):
                raise ConfigError(f"{key}={value!r}: no such folder")

"""`train(cfg)`: one fine-tuning run from a composed Hydra config, resumable by rerunning it.

Order of events: export the ranks of a submitit task (`t3.launch`); validate the config (one-line
`ConfigError` on anything impossible, before any model is built); for ``dry_run=true`` report the plan
and stop; otherwise build the data module, the `T3FinetuneModule`, the strategy, loggers and callbacks,
and a Lightning ``Trainer`` whose gradient accumulation keeps the global batch fixed for any GPU count;
fit, resuming from the newest intact checkpoint (step checkpoints and SLURM pre-emption saves, verified
against their checksums and the config's training digest: `t3.training.checkpoints`) when one exists, or
with ``resume=false`` after moving the previous run's outputs aside; export the fine-tuned DiT.

``run_dir`` is a pure function of the config (``outputs/<experiment_name>`` by default), so killing a run
and rerunning the same command continues it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from t3.config import RunFacts, validate
from t3.training.checkpoints import (
    ChecksummedTrainer,
    ResumeRefusedError,
    find_resume_checkpoint,
    move_run_aside,
    newest_checkpoint,
    training_digest,
)

__all__ = ["main", "train"]

logger = logging.getLogger(__name__)


class _LightningNoise(logging.Filter):
    """Drops Lightning's advertisement for its cloud logger and its notes restating t3's own settings."""

    PATTERNS = ("litlogger", "was configured so")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p in message for p in self.PATTERNS)


def _setup_logging() -> None:
    """One log stream, from rank zero, without third-party noise.

    ``import lightning`` adds a console handler of its own unconditionally; under Hydra (or any configured
    root logger) every Lightning message would print twice, so it is dropped then. On ranks other than
    zero, t3's own INFO messages are silenced (warnings and errors still show). Lightning's "litlogger"
    tip and its notes on ``limit_val_batches`` are dropped, and so is a deprecation warning that Lightning
    triggers inside torch on every run (nothing a user can act on).
    """
    import warnings

    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    lightning_info = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _LightningNoise) for f in lightning_info.filters):
        lightning_info.addFilter(_LightningNoise())
    if rank_zero_only.rank > 0:
        logging.getLogger("t3").setLevel(logging.WARNING)
    if logging.getLogger().handlers:
        lightning_logger = logging.getLogger("lightning")
        for handler in list(lightning_logger.handlers):
            if type(handler) is logging.StreamHandler:
                lightning_logger.removeHandler(handler)


@contextlib.contextmanager
def _train_log(cfg: DictConfig) -> Iterator[None]:
    """Append t3's and Lightning's log records to ``${run_dir}/train.log`` on rank 0 while training.

    Under ``python train.py`` Hydra's job log is already that file (its run dir is the run dir); then
    nothing is added. Sweep jobs and programmatic runs get the file here. Dry runs write none.
    """
    from t3.launch import prepare_distributed_environment

    prepare_distributed_environment()  # idempotent: the ranks of a submitit task, before reading ours
    path = (Path(cfg.run_dir) / "train.log").resolve()
    root = logging.getLogger()
    if (
        cfg.get("dry_run")
        or rank_zero_only.rank > 0
        or any(
            isinstance(h, logging.FileHandler) and Path(h.baseFilename).resolve() == path
            for h in root.handlers
        )
    ):
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    handler.setLevel(logging.INFO)
    loggers = [logging.getLogger(name) for name in ("t3", "lightning")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        if lg.getEffectiveLevel() > logging.INFO:  # without a configured root logger: INFO goes nowhere
            lg.setLevel(logging.INFO)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)
        handler.close()


def _dataset_factory(node: Any) -> Any:
    if node is None:
        return None
    return lambda: instantiate(node, _convert_="all")


def _sweep_variant() -> str | None:
    """In a Hydra multirun job, the overrides that make it one variant of its sweep (its folder name)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return HydraConfig.get().job.override_dirname or None


def wandb_name_and_group(cfg: DictConfig, variant: str | None) -> tuple[str, str | None]:
    """The wandb run name and group of a run; ``variant``: its sweep job's overrides, or None.

    A sweep job is named ``<experiment>/<variant>`` and grouped by its study, so the jobs of a study
    are told apart and shown together; ``logger.name`` and ``logger.group`` win when set.
    """
    name = cfg.logger.get("name") or (f"{cfg.experiment_name}/{variant}" if variant else cfg.experiment_name)
    group = cfg.logger.get("group") or (cfg.experiment_name if variant is not None else None)
    return name, group


def _build_loggers(cfg: DictConfig, run_dir: Path) -> list[Any]:
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    loggers: list[Any] = []
    if cfg.logger.csv:
        # One version per (re)start: csv/version_<n>/metrics.csv. Lightning's CSV writer deletes an existing
        # metrics.csv in its folder, so a resumed run must not reuse the folder of the run it continues.
        loggers.append(CSVLogger(save_dir=str(run_dir), name="csv"))
    if cfg.logger.wandb:
        name, group = wandb_name_and_group(cfg, _sweep_variant())
        loggers.append(
            WandbLogger(
                project=cfg.logger.project,
                entity=cfg.logger.entity,
                name=name,
                group=group,
                id=_wandb_run_id(run_dir),
                resume="allow",
                save_dir=str(run_dir),
                offline=os.environ.get("WANDB_MODE", cfg.logger.mode) == "offline",
                mode=os.environ.get("WANDB_MODE", cfg.logger.mode),
                tags=list(cfg.tags),
            )
        )
    return loggers


def _wandb_run_id(run_dir: Path) -> str:
    """The run's wandb id, created once and kept in the run dir so that a resumed run continues it."""
    path = run_dir / "wandb_id.txt"
    if path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    if rank_zero_only.rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(run_id + "\n")
    return run_id


def _callbacks(cfg: DictConfig, facts: RunFacts, run_dir: Path) -> list[Callback]:
    from t3.training.callbacks import (
        DataSkipMonitor,
        EMACallback,
        ProgressLog,
        SampleVideoCallback,
        StepCheckpoint,
        StepTimer,
    )

    callbacks: list[Callback] = [
        ProgressLog(cfg.progress_every_n_steps, cfg.trainer.max_steps),
        # Keep the newest checkpoint.keep step checkpoints and point last.ckpt at the newest: a damaged or
        # interrupted save leaves older ones to resume from (t3.training.checkpoints).
        StepCheckpoint(
            dirpath=str(run_dir / "checkpoints"),
            filename="step={step:07d}",
            auto_insert_metric_name=False,
            every_n_train_steps=cfg.checkpoint.every_n_steps,
            monitor="step",
            mode="max",
            save_top_k=cfg.checkpoint.keep,
            save_last="link",
            # last.ckpt is relinked, never versioned (last-v1.ckpt) while an older checkpoint it links stays.
            enable_version_counter=False,
            save_on_train_epoch_end=False,
        ),
        StepTimer(cfg.batch.global_size, int(torch.tensor(facts.grid).prod())),
        DataSkipMonitor(cfg.data.max_skipped_fraction, sequence_parallel_size=facts.sequence_parallel_size),
    ]
    if cfg.ema.enabled:
        callbacks.append(EMACallback(cfg.ema.decay))
    if cfg.validation.sample_videos.enabled and cfg.validation.every_n_steps > 0:
        callbacks.append(
            SampleVideoCallback(
                OmegaConf.to_object(cfg.validation.sample_videos),  # type: ignore[arg-type]
                model=OmegaConf.to_container(cfg.model, resolve=True),  # type: ignore[arg-type]
                size=(cfg.data.height, cfg.data.width, cfg.data.num_frames),
                flow_shift=cfg.objective.flow_shift,
                out_dir=run_dir / "samples",
                cache_dir=cfg.paths.cache_dir,
            )
        )
    return callbacks


def _log_config(trainer: L.Trainer, cfg: DictConfig) -> None:
    params = OmegaConf.to_container(cfg, resolve=True)
    for lg in trainer.loggers:
        lg.log_hyperparams(params)  # type: ignore[arg-type]


def train(cfg: DictConfig, *, callbacks: Sequence[Callback] = ()) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run (or continue) the training run described by ``cfg`` and write its ``summary.json``.

    The summary (`t3.summary`) records how the run ended, its final metrics, speed and exported
    checkpoint; a failed run records the error and re-raises. Dry runs write none.

    A rerun of a finished run (or a requeued task that finds its run finished) trains nothing; it keeps
    the metrics and speed of the summary that the finished run wrote at the same step, rather than
    replacing them with nothing.
    """
    started = time.time()
    try:
        with _train_log(cfg):
            metrics, objects = _train(cfg, callbacks=callbacks)
    except Exception as err:
        # A refused resume ran nothing: the folder's summary stays that of the run it holds.
        if not cfg.get("dry_run") and not isinstance(err, ResumeRefusedError):
            from t3.summary import describe_error

            write_train_summary(cfg, "failed", started, error=describe_error(err))
        raise
    if not cfg.dry_run:
        exported = objects["exported"].get("diffusers") or objects["exported"].get("wan")
        step = objects["trainer"].global_step
        earlier = _finished_summary(cfg.run_dir, step) if objects["steps_trained"] == 0 else None
        if earlier is not None:
            metrics = {**earlier["metrics"], **{k: v for k, v in earlier["speed"].items() if k != "device"}}
        write_train_summary(
            cfg, "completed", started, metrics=metrics, checkpoint=exported, step=step, earlier=earlier
        )
    return metrics, objects


def main(cfg: DictConfig) -> float | None:
    """The ``entry`` of a training config (``python train.py experiment=...``): `train`, then the final
    ``train/loss``, the value a Hydra sweeper minimises."""
    metrics, _ = train(cfg)
    return metrics.get("train/loss")


def _finished_summary(run_dir: str | Path, step: int) -> dict[str, Any] | None:
    """The summary a finished run left in ``run_dir`` for optimizer step ``step``, or None (logged)."""
    from t3.summary import read_run_summary

    try:
        summary = read_run_summary(run_dir)
    except (FileNotFoundError, ValueError) as err:
        logger.warning("nothing left to train at step %d and no earlier results to keep (%s)", step, err)
        return None
    if summary["status"] != "completed" or summary.get("step") != step:
        logger.warning(
            "nothing left to train at step %d; the earlier summary in %s (%s, step %s) is not of this "
            "checkpoint, so this run has no metrics",
            step, run_dir, summary["status"], summary.get("step"),
        )  # fmt: skip
        return None
    logger.info("nothing left to train at step %d: keeping the results of the run finished at %s",
                step, summary.get("results_from") or summary.get("finished"))  # fmt: skip
    return summary


# Metrics that are speed or cost figures: the summary's ``speed`` section (with the device), not ``metrics``.
_COST_PREFIXES = ("perf/", "macs/")


def write_train_summary(
    cfg: DictConfig,
    status: str,
    started: float,
    *,
    metrics: dict[str, Any] | None = None,
    checkpoint: Any = None,
    error: str | None = None,
    step: int | None = None,
    earlier: dict[str, Any] | None = None,
) -> None:
    """Write ``run_dir/summary.json`` on rank 0; never let bookkeeping hide the run's own outcome.

    ``earlier``: the summary of the finished run this one repeats (it trained nothing); its metrics and
    speed, measured device included, are kept as they were.
    """
    if rank_zero_only.rank != 0:
        return
    from hydra.core.hydra_config import HydraConfig

    from t3.profiling import device_name
    from t3.summary import write_run_summary

    metrics = metrics or {}
    try:
        try:
            resolved: Any = OmegaConf.to_container(cfg, resolve=True)
        except Exception:  # an unresolvable config may be why the run failed
            resolved = OmegaConf.to_yaml(cfg)
        device = "cuda" if cfg.trainer.accelerator != "cpu" and torch.cuda.is_available() else "cpu"
        write_run_summary(
            cfg.run_dir,
            task="train",
            status=status,
            experiment=cfg.experiment_name,
            overrides=list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else [],
            resolved_config=resolved,
            metrics={k: v for k, v in metrics.items() if not k.startswith(_COST_PREFIXES)},
            speed=earlier["speed"]
            if earlier is not None
            else {
                **{k: v for k, v in metrics.items() if k.startswith(_COST_PREFIXES)},
                "device": device_name(device),
            },
            checkpoint=str(checkpoint or newest_checkpoint(cfg.run_dir) or "") or None,
            error=None if error is None else error.splitlines()[0],
            started=started,
            step=step,
            results_from=None
            if earlier is None
            else (earlier.get("results_from") or earlier.get("finished")),
        )
    except Exception as err:  # noqa: BLE001
        logger.warning("could not write the run summary: %s", err)


def _train(cfg: DictConfig, *, callbacks: Sequence[Callback] = ()) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run (or continue) the training run described by ``cfg``.

    Args:
        cfg: A config composed from ``conf/train.yaml`` (``hydra.compose`` or ``@hydra.main``).
        callbacks: Extra Lightning callbacks (tests use this to interrupt a run).

    Returns:
        ``(metrics, objects)``: the final logged metrics as floats, and the built objects (``cfg``,
        ``facts``, ``trainer``, ``module``, ``datamodule``, ``exported``) and ``steps_trained`` (optimizer
        steps run by this process); for a dry run the metrics of the plan and ``plan``.

    Raises:
        t3.config.ConfigError: On an impossible config, before anything heavy is built.
    """
    from t3.launch import cluster_plugins, prepare_distributed_environment

    # First: inside a submitit task, export its ranks before anything reads them (a no-op otherwise).
    prepare_distributed_environment()
    _setup_logging()
    facts = validate(cfg)
    if cfg.dry_run:
        from t3.training.dry_run import dry_run

        return dry_run(cfg, facts)

    from t3.training.datamodule import T3DataModule
    from t3.training.export import export_dit
    from t3.training.module import T3FinetuneModule
    from t3.training.strategies import (
        build_strategy,
        fsdp2_parallelize,
        gather_state_dict,
        sequence_parallel_loss_scale,
        sequence_parallelize,
    )

    run_dir = Path(cfg.run_dir)
    digest = training_digest(cfg)
    ckpt_path = _resume_point(cfg, run_dir, digest)  # before anything heavy is built
    L.seed_everything(cfg.seed, workers=True)
    if cfg.trainer.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)

    strategy_cfg = OmegaConf.to_object(cfg.strategy)
    on_gpu = cfg.trainer.accelerator != "cpu"
    bf16 = "bf16" in cfg.trainer.precision
    strategy = build_strategy(
        strategy_cfg,  # type: ignore[arg-type]
        accelerator=cfg.trainer.accelerator,
        world_size=facts.world_size,
        micro_batch_size=cfg.batch.micro_size,
    )
    module = T3FinetuneModule(
        model=OmegaConf.to_object(cfg.model),  # type: ignore[arg-type]
        schedule=facts.schedule,
        finetune=OmegaConf.to_object(cfg.finetune),  # type: ignore[arg-type]
        optim=OmegaConf.to_object(cfg.optim),  # type: ignore[arg-type]
        objective=OmegaConf.to_object(cfg.objective),  # type: ignore[arg-type]
        validation=OmegaConf.to_object(cfg.validation),  # type: ignore[arg-type]
        max_steps=cfg.trainer.max_steps,
        seed=cfg.seed,
        accumulate=facts.accumulate,
        max_consecutive_bad_steps=cfg.max_consecutive_bad_steps,
        cpu_offload_optimizer=cfg.strategy.name == "deepspeed" and cfg.strategy.offload_optimizer,
        parallelize=fsdp2_parallelize if cfg.strategy.name == "fsdp2" else None,
        param_dtype=torch.bfloat16 if (bf16 and on_gpu) else None,
        sequence_parallelize=functools.partial(sequence_parallelize, cfg=OmegaConf.to_object(cfg.parallel))
        if facts.sequence_parallel_size > 1
        else None,
        loss_scale=sequence_parallel_loss_scale(facts.world_size, facts.sequence_parallel_size),
    )
    validate_every = cfg.validation.every_n_steps if cfg.data.val is not None else 0
    datamodule = T3DataModule(
        train=_dataset_factory(cfg.data.train),
        val=_dataset_factory(cfg.data.val) if validate_every else None,
        prepare=_dataset_factory(cfg.data.prepare),
        micro_batch_size=cfg.batch.micro_size,
        accumulate=facts.accumulate,
        seed=cfg.seed,
        sequence_parallel_size=facts.sequence_parallel_size,
        num_workers=cfg.data.num_workers,
        val_num_batches=cfg.validation.num_batches,
    )

    trainer = ChecksummedTrainer(
        training_digest=digest,
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        num_nodes=cfg.trainer.num_nodes,
        strategy=strategy,
        precision=cfg.trainer.precision,
        max_steps=cfg.trainer.max_steps,
        max_epochs=-1,
        accumulate_grad_batches=facts.accumulate,
        gradient_clip_val=cfg.trainer.gradient_clip_val or None,
        gradient_clip_algorithm="norm",
        # Validation is counted in training batches: every_n_steps optimizer steps of `accumulate` each.
        val_check_interval=validate_every * facts.accumulate if validate_every else None,
        check_val_every_n_epoch=None,
        limit_val_batches=cfg.validation.num_batches if validate_every else 0,
        num_sanity_val_steps=0,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        logger=False,  # attached below, once the last check has passed: a failed start leaves no wandb run
        callbacks=[*_callbacks(cfg, facts, run_dir), *callbacks],
        # Who started the processes (Lightning, torchrun, srun or submitit): see t3.launch.
        plugins=cluster_plugins(num_processes=facts.world_size),
        default_root_dir=str(run_dir),
        # The data module shards data by rank itself (seeded, step-indexed); no DistributedSampler.
        use_distributed_sampler=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=False,
    )
    if trainer.world_size != facts.world_size:
        from t3.config import ConfigError

        raise ConfigError(
            f"trainer.devices={cfg.trainer.devices!r}: the launcher started {trainer.world_size} processes but the "
            f"config implies {facts.world_size} (devices x num_nodes); make them agree"
        )
    trainer.loggers = _build_loggers(cfg, run_dir)
    _log_config(trainer, cfg)
    if ckpt_path:
        logger.info("resuming from %s", ckpt_path)
    logger.info(
        "training %s: %d steps, global batch %d = %d x %d data-parallel x %d accumulation "
        "(%d GPUs, %d per video), run dir %s",
        cfg.experiment_name,
        cfg.trainer.max_steps,
        cfg.batch.global_size,
        cfg.batch.micro_size,
        facts.data_parallel_size,
        facts.accumulate,
        facts.world_size,
        facts.sequence_parallel_size,
        run_dir,
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)

    exported: dict[str, Any] = {}
    if cfg.export.formats:
        exported = _export(cfg, trainer, module, run_dir, gather_state_dict, export_dit)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    # Speed of the run: the median step, not whichever step happened to be logged last.
    from t3.training.callbacks import StepTimer

    timer = next(c for c in trainer.callbacks if isinstance(c, StepTimer))
    metrics.update(timer.summary())
    metrics.update(_macs(cfg, facts))
    objects = {
        "cfg": cfg,
        "facts": facts,
        "trainer": trainer,
        "module": module,
        "datamodule": datamodule,
        "exported": exported,
        "steps_trained": len(timer.step_seconds),  # optimizer steps this process ran (0 on a finished run)
    }
    return metrics, objects


def _resume_point(cfg: DictConfig, run_dir: Path, digest: tuple[str, dict[str, Any]]) -> str | None:
    """The checkpoint to resume from (`t3.training.checkpoints`), or None to start; ``resume=false`` moves
    the previous run's outputs aside first (on global rank 0)."""
    if not cfg.resume:
        if rank_zero_only.rank == 0:
            moved = move_run_aside(run_dir)
            if moved is not None:
                logger.info("resume=false: the previous run's outputs are now in %s", moved)
        return None
    return find_resume_checkpoint(
        run_dir, digest[0], settings=digest[1], allow_changed_config=cfg.resume_changed_config
    )


def _macs(cfg: DictConfig, facts: RunFacts) -> dict[str, float]:
    """MACs of one DiT forward per sample with the run's schedule (`t3.attention.flops`): the cost figures
    of the run's summary, beside its speed."""
    from t3.attention.flops import dit_macs
    from t3.models.presets import get_spec

    spec = get_spec(cfg.model.preset)
    macs = dit_macs(spec.dit_config, facts.grid, text_tokens=spec.text_len, schedule=facts.schedule)
    return {"macs/self_attention": float(macs.self_attention), "macs/dit_forward": float(macs.total)}


def _export(
    cfg: DictConfig, trainer: L.Trainer, module: Any, run_dir: Path, gather: Any, export: Any
) -> dict[str, Any]:
    from t3.models.record import T3Record
    from t3.summary import config_digest
    from t3.training.callbacks import EMACallback
    from t3.training.finetune import lora_scaling

    state = gather(trainer, module.dit)  # collective
    written: dict[str, Any] = {}
    if trainer.is_global_zero:
        common = {
            "formats": list(cfg.export.formats),
            "lora_scaling": lora_scaling(OmegaConf.to_object(cfg.finetune)),  # type: ignore[arg-type]
            "dtype": cfg.export.dtype,
            "preset": cfg.model.preset,
            # What the weights were trained with, beside them: eval.py and load_dit use its schedule.
            "record": T3Record(
                schedule=module.schedule,
                model_preset=cfg.model.preset,
                resolution=(cfg.data.height, cfg.data.width, cfg.data.num_frames),
                step=trainer.global_step,
                config_digest=config_digest(OmegaConf.to_container(cfg, resolve=True)),  # as in summary.json
            ),
        }
        config = dict(module.dit.config)
        written = export(state, config, run_dir / "export", **common)
        ema = next((c for c in trainer.callbacks if isinstance(c, EMACallback)), None)
        if ema is not None and ema.shadow is not None:
            ema_state = {**state, **{k: v.detach().to("cpu", state[k].dtype) for k, v in ema.shadow.items()}}
            written.update(
                {
                    f"ema_{k}": v
                    for k, v in export(ema_state, config, run_dir / "export_ema", **common).items()
                }
            )
    trainer.strategy.barrier()
    return written

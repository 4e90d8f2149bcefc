"""``eval.py``'s task: turn the composed ``conf/eval.yaml`` into a call of one stage.

* ``stage=generate`` (default): this shard's videos (`t3.eval.generate_stage.run_generation`);
  ``dry_run=true`` prints one line per shard and loads nothing. Under ``torchrun`` every rank runs it:
  one video at a time per SP group of ``parallel.sequence_parallel_size`` ranks, the groups splitting
  the prompts;
* ``stage=score``: ``results.json`` / ``results.md`` / wandb table (`t3.eval.score_stage.run_scoring`);
* ``stage=speed``: dense vs T3 latency, memory and MACs (`t3.eval.speed_stage.run_speed`).

``score`` and ``speed`` run in one process: under ``torchrun`` (``WORLD_SIZE > 1``) they are refused (every
rank would write the same results), and ``speed`` refuses ``parallel.sequence_parallel_size > 1`` (it
measures a DiT on one device).

Config values are checked here, before any weights are read; errors are one line naming the key, and
`main` (what ``eval.py`` calls) prints them as that one line instead of a traceback.
Relative paths are relative to the working directory (Hydra does not change it, ``hydra.job.chdir=false``).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from t3.attention import Schedule, get_schedule
from t3.eval.generate_stage import run_generation
from t3.eval.prompts import PromptEntry, describe_shards, load_prompts, resolve_shard
from t3.eval.score_stage import run_scoring
from t3.eval.settings import (
    check_parallel,
    check_settings,
    generation_settings,
    model_paths,
    parallel_settings,
    score_settings,
    speed_settings,
)
from t3.eval.speed_stage import run_speed
from t3.models.record import T3Record, choose_schedule
from t3.parallel.layout import SP_KEY
from t3.parallel.torchrun import env_world_size
from t3.summary import describe_error, write_run_summary

__all__ = ["STAGES", "eval_schedule", "main", "register_resolvers", "run"]

logger = logging.getLogger(__name__)

STAGES = ("generate", "score", "speed")


def _existing_record(path: str | None) -> T3Record | None:
    """The T3 record of the checkpoint at ``path``; None without a path, a checkpoint or a record (a
    missing checkpoint is reported in one line by the stage that loads it; a malformed record here)."""
    if path is None:
        return None
    from t3.models import read_record

    try:
        return read_record(path)
    except FileNotFoundError:
        return None


def recorded_schedule_name(ckpt: str | None, dit_path: str | None, fallback: str) -> str:
    """``${t3.recorded_schedule:...}`` of ``conf/t3/from_checkpoint.yaml``: the schedule name the
    checkpoint's record gives (it names the output folder), else ``fallback``."""
    try:
        record = _existing_record(ckpt if ckpt is not None else dit_path)
    except ValueError:  # a malformed record: eval_schedule reports it in one line
        return fallback
    return fallback if record is None else record.schedule.name


def eval_schedule(cfg: DictConfig) -> Schedule:
    """The T3 schedule to evaluate with: the checkpoint's recorded one by default (``t3=from_checkpoint``,
    else ``t3.fallback`` without a record); an explicit ``t3=...`` that differs from the record is refused
    unless ``allow_schedule_change=true``.

    Raises:
        t3.models.record.ScheduleConflictError: one line naming the checkpoint and both schedules.
    """
    from hydra.utils import instantiate

    path = model_paths(cfg).dit_path
    record = _existing_record(path)
    if cfg.t3.get("from_checkpoint"):
        if record is not None:
            logger.info("%s: evaluating with its T3 schedule %r (its record)", path, record.schedule.name)
            return record.schedule
        fallback = cfg.t3.fallback
        if path is not None:
            logger.warning(
                "%s has no T3 record: evaluating with t3=%s (the default); choose with t3=<schedule>",
                path, fallback,
            )  # fmt: skip
        try:
            return get_schedule(fallback)
        except KeyError as err:
            raise ValueError(f"t3.fallback={fallback!r}: {err.args[0]}") from None
    schedule = instantiate(cfg.t3)
    if not isinstance(schedule, Schedule):
        raise ValueError(f"t3: expected a T3 schedule config (conf/t3/*.yaml), got {type(schedule).__name__}")
    chosen = choose_schedule(record, schedule, allow_change=bool(cfg.allow_schedule_change), source=str(path))
    assert chosen is not None
    return chosen


def register_resolvers() -> None:
    """Register ``${t3.recorded_schedule:...}`` with OmegaConf (idempotent), for ``conf/t3/from_checkpoint.yaml``."""
    OmegaConf.register_new_resolver("t3.recorded_schedule", recorded_schedule_name, replace=True)


def _prompts(cfg: DictConfig) -> list[PromptEntry]:
    path = cfg.benchmark.prompts
    if path is None:
        raise ValueError(
            f"benchmark.prompts is null for benchmark {cfg.benchmark.name!r}; give a prompt list"
        )
    if not Path(path).is_file():
        raise FileNotFoundError(f"benchmark.prompts={str(path)!r}: no such file (relative to {Path.cwd()})")
    return load_prompts(path, limit=cfg.benchmark.get("limit"))


def main(cfg: DictConfig) -> Any:
    """`run` for the command line (``eval.py``): bad input ends the process with one line, exit status 1.

    Bad input is what the stages reject, each naming the key, file or value: ``ValueError`` (a config
    value, a malformed file), ``OSError`` (a missing file or folder) and OmegaConf's errors (a value that
    cannot be resolved). ``HYDRA_FULL_ERROR=1`` shows the traceback instead, as for Hydra's own errors.
    """
    from omegaconf.errors import OmegaConfBaseException

    try:
        return run(cfg)
    except (ValueError, OSError, OmegaConfBaseException) as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        raise SystemExit(f"eval error: {describe_error(err)}") from None


def run(cfg: DictConfig) -> Any:
    """Run the stage ``cfg.stage`` of ``conf/eval.yaml``.

    Returns:
        ``generate``: a `GenerationSummary` (the dry run: the printed lines); ``score``: the content of
        ``results.json``; ``speed``: the content of ``speed.json``.

    Raises:
        ValueError: For an unknown stage or a bad config value (one line naming the key).
    """
    stage = cfg.stage
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r}: expected one of {list(STAGES)}")
    if stage == "generate":
        return _run_generate(cfg)
    _check_one_process(cfg)
    started = time.time()
    if stage == "score":
        report = _run_score(cfg)
        metrics = {name: m["value"] for name, m in report["metrics"].items()}
        _write_summary(cfg, cfg.out_dir, started, metrics=metrics, speed={})
        return report
    report = _run_speed(cfg)
    ratios = {
        f"{pair}/{k}": v for pair, r in report["ratios"].items() for k, v in r.items()
    }  # dense/<t3>/...
    _write_summary(
        cfg, cfg.speed.out_dir, started, metrics={}, speed={**ratios, "device": report["setup"].get("device")}
    )
    return report


def _check_one_process(cfg: DictConfig) -> None:
    """``score`` and ``speed`` run in one process, ``speed`` without sequence parallelism (one line)."""
    world = env_world_size()
    if world > 1:
        raise ValueError(
            f"stage={cfg.stage} runs in one process, not under torchrun (WORLD_SIZE={world}); "
            f"run it with python eval.py stage={cfg.stage} ..."
        )
    sp = parallel_settings(cfg).sequence_parallel_size
    if cfg.stage == "speed" and sp != 1:
        raise ValueError(
            f"{SP_KEY}={sp}: stage=speed measures one process on one device; accepted: 1 "
            "(time sequence-parallel generation from the records' timings_s of stage=generate)"
        )


def _write_summary(cfg: DictConfig, out_dir: str, started: float, *, metrics: dict, speed: dict) -> None:
    """``summary.json`` of a score or speed run, beside its results (for ``python -m t3.report``)."""
    from hydra.core.hydra_config import HydraConfig

    write_run_summary(
        out_dir,
        task=f"eval/{cfg.stage}",
        status="completed",
        experiment=f"{cfg.benchmark.name}/{cfg.run_name}",
        overrides=list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else [],
        resolved_config=OmegaConf.to_container(cfg, resolve=True),
        metrics=metrics,
        speed=speed,
        checkpoint=cfg.get("ckpt") or cfg.model.get("dit_path"),
        started=started,
    )


def _run_generate(cfg: DictConfig) -> Any:
    entries = _prompts(cfg)
    shard_index, num_shards = resolve_shard(cfg.shard_index, cfg.num_shards)
    settings = generation_settings(cfg)
    model = model_paths(cfg)
    parallel = parallel_settings(cfg)
    schedule = eval_schedule(cfg)
    if cfg.dry_run:
        check_settings(settings, model, schedule)  # a dry run is also the cheap check of a config
        check_parallel(parallel, settings, model, env_world_size())
        lines = describe_shards(entries, num_shards)
        for line in lines:
            print(line)  # noqa: T201 - the dry run's listing is the CLI's output
        logger.info(
            "dry run: %d prompt(s) x %d seed(s) of %s into %s; nothing loaded",
            len(entries), len(settings.seeds), cfg.benchmark.name, cfg.out_dir,
        )  # fmt: skip
        return lines
    return run_generation(
        entries,
        out_dir=cfg.out_dir,
        settings=settings,
        model=model,
        schedule=schedule,
        shard_index=shard_index,
        num_shards=num_shards,
        hash_cache=cfg.get("hash_cache"),
        parallel=parallel,
    )


def _run_score(cfg: DictConfig) -> dict[str, Any]:
    entries = _prompts(cfg)
    settings = score_settings(cfg)
    wandb_config = OmegaConf.to_container(cfg.wandb, resolve=True)
    if not wandb_config.get("name"):
        wandb_config["name"] = f"eval-{cfg.benchmark.name}-{cfg.run_name}"
    return run_scoring(
        entries,
        out_dir=cfg.out_dir,
        seeds=generation_settings(cfg).seeds,
        settings=settings,
        data_root=cfg.benchmark.get("data_root"),
        benchmark=cfg.benchmark.name,
        wandb_config=wandb_config,
    )


def _run_speed(cfg: DictConfig) -> dict[str, Any]:
    speed, out_dir = speed_settings(cfg)
    return run_speed(
        model=model_paths(cfg),
        schedule=eval_schedule(cfg),
        generation=generation_settings(cfg),
        speed=speed,
        out_dir=out_dir,
    )

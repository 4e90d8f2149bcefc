"""The CPU demo's pipeline (``python train.py``; what it does and shows: README.md, "The CPU demo").

Four stages on configs derived from the demo's own (``conf/experiment/demo.yaml``), each training stage an
ordinary `t3.training.train` run: dense pretraining at ``demo.pretrain``'s size (cached under
``${paths.cache_dir}/demo/pretrain-<key>``), the T3 fine-tune at ``data``'s size, the same fine-tune with
dense attention (the control), then `t3.demo.evaluation.evaluate` and the outputs of `t3.demo.report`.
`main` is the ``entry`` of the demo experiment.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from t3.config import TRAIN_ENTRY, ConfigError, validate
from t3.demo.evaluation import evaluate
from t3.demo.metrics import FD_NAME
from t3.demo.report import control_table, results_markdown, results_table, write_plot, write_videos
from t3.demo.settings import DemoConfig, demo_settings

__all__ = ["finetune_config", "main", "pretrain_config", "pretrain_key", "run_demo"]

logger = logging.getLogger(__name__)

# Bump when the pretraining recipe changes in a way the settings below do not capture.
_PRETRAIN_RECIPE_VERSION = 1

#: The two fine-tunes, by attention: the demo's T3 schedule, and dense (the control).
FINETUNES = ("t3", "dense")


# --- stage configs ----------------------------------------------------------------------------------------


def _derive(cfg: DictConfig, overrides: Mapping[str, Any]) -> DictConfig:
    """A plain training config: a copy of ``cfg`` with dotted ``overrides``, without the demo's own keys.

    Interpolations (``${data.height}`` ...) stay live.
    """
    out = copy.deepcopy(cfg)
    with open_dict(out):
        for key, value in {"entry": TRAIN_ENTRY, "demo": None, **overrides}.items():
            OmegaConf.update(out, key, value, merge=False)
    return out


def _dense_schedule() -> dict[str, Any]:
    """The ``t3`` node of a dense stage: `t3.get_schedule` ``("dense")``."""
    return {"_target_": "t3.attention.get_schedule", "name": "dense"}


def pretrain_key(cfg: DictConfig, demo: DemoConfig) -> str:
    """Hash of every setting that changes the pretrained weights: the name of the pretraining cache entry.

    Paths, logging, checkpoint and validation settings are left out: they do not change the weights.
    """
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(resolved, dict)
    settings = {
        "recipe": _PRETRAIN_RECIPE_VERSION,
        "pretrain": {k: v for k, v in asdict(demo.pretrain).items() if k not in ("val_samples", "val_every")},
        "num_frames": resolved["data"]["num_frames"],
        "model": {
            k: resolved["model"][k]
            for k in ("preset", "seed", "attention_backend", "vae_path", "text_encoder_path")
        },
        "seed": resolved["seed"],
        "batch": resolved["batch"],
        "optim": {k: v for k, v in resolved["optim"].items() if k != "lr"},
        "objective": resolved["objective"],
        "finetune": {k: resolved["finetune"][k] for k in ("trainable", "gradient_checkpointing")},
        "trainer": {k: resolved["trainer"][k] for k in ("precision", "gradient_clip_val")},
    }
    blob = json.dumps(settings, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def pretrain_config(cfg: DictConfig, demo: DemoConfig) -> DictConfig:
    """Stage 1's training config: the demo's, at the pretraining size, dense, from random weights."""
    pre = demo.pretrain
    micro = int(cfg.batch.micro_size)
    run_dir = Path(cfg.paths.cache_dir) / "demo" / f"pretrain-{pretrain_key(cfg, demo)}"
    return _derive(
        cfg,
        {
            "experiment_name": "demo_pretrain",
            "run_dir": str(run_dir),
            "resume": True,  # an interrupted pretraining continues from its last checkpoint
            "t3": _dense_schedule(),
            "model.init_from": None,
            "model.random_init": True,
            "data.height": pre.height,
            "data.width": pre.width,
            "data.train.num_samples": pre.num_samples,
            "data.val.num_samples": pre.val_samples,
            "validation.every_n_steps": pre.val_every,
            "validation.num_batches": max(math.ceil(pre.val_samples / micro), 1),
            "trainer.max_steps": pre.steps,
            "optim.lr": pre.lr,
            "checkpoint.every_n_steps": max(pre.steps // 4, 1),
            "export.formats": ["diffusers"],
        },
    )


def finetune_config(cfg: DictConfig, pretrained: Path | str, attention: str) -> DictConfig:
    """Stage 2's training config for ``attention`` (``t3``: the demo's schedule; ``dense``: the control).

    Both are the demo's own settings (size, steps, data, seed, optimizer) from the pretrained export, so
    the attention is the only difference between them.
    """
    if attention not in FINETUNES:
        raise ValueError(f"attention must be one of {FINETUNES}, got {attention!r}")
    overrides: dict[str, Any] = {
        "experiment_name": f"demo_finetune_{attention}",
        "run_dir": str(Path(cfg.run_dir) / f"finetune_{attention}"),
        "resume": False,  # a fresh fine-tune every run: it is the step being demonstrated
        "model.init_from": str(pretrained),
        "model.random_init": False,
        "export.formats": ["diffusers"],
    }
    if attention == "dense":
        overrides["t3"] = _dense_schedule()
    return _derive(cfg, overrides)


# --- stages 1 and 2: training -----------------------------------------------------------------------------


def _run_training(cfg: DictConfig) -> tuple[Path, dict[str, float]]:
    """`t3.training.train` on ``cfg`` (its progress lines and bar included); returns the diffusers export
    folder and the final metrics."""
    from t3.training import train

    metrics, _ = train(cfg)
    return Path(cfg.run_dir) / "export" / "diffusers", metrics


def pretrain(cfg: DictConfig, demo: DemoConfig) -> tuple[Path, dict[str, Any]]:
    """Stage 1: dense pretraining at the low resolution, or the cached result of an earlier run.

    Returns:
        ``(export folder, info)``; ``info`` has ``cached``, ``run_dir``, ``key`` and ``seconds`` (of this
        call; the original training time is kept in ``train_seconds``).
    """
    pre_cfg = pretrain_config(cfg, demo)
    try:
        validate(pre_cfg)  # a bad demo.pretrain size is named as such, not as data.height
    except ConfigError as err:
        raise ConfigError(f"demo.pretrain (stage 1, dense pretraining): {err}") from None
    run_dir = Path(pre_cfg.run_dir)
    marker = run_dir / "demo_pretrain.json"
    start = time.perf_counter()
    if marker.is_file():
        info = json.loads(marker.read_text())
        logger.info(
            "stage 1/4: reusing the pretrained dense model from %s (cache key %s)", run_dir, info["key"]
        )
        export = Path(info["export"])
        return export, {**info, "cached": True, "seconds": time.perf_counter() - start}

    pre = demo.pretrain
    logger.info(
        "stage 1/4: pretraining the %s DiT with dense attention at %dx%dx%d, %d steps (cached in %s)",
        cfg.model.preset,
        pre.height,
        pre.width,
        cfg.data.num_frames,
        pre.steps,
        run_dir,
    )
    export, _ = _run_training(pre_cfg)
    info = {
        "key": run_dir.name.removeprefix("pretrain-"),
        "run_dir": str(run_dir),
        "export": str(export),
        "settings": asdict(pre),
        "train_seconds": time.perf_counter() - start,
    }
    from t3.io import write_json_atomic

    # Written last: its presence means the export is complete.
    write_json_atomic(marker, info)
    return export, {**info, "cached": False, "seconds": info["train_seconds"]}


def finetune(cfg: DictConfig, pretrained: Path, attention: str) -> tuple[Path, dict[str, Any]]:
    """Stages 2 and 3: ``attention`` (``t3``, or ``dense``: the control) fine-tuned at the high resolution
    from ``pretrained``.

    Returns:
        ``(export folder, info)`` with ``run_dir``, ``export``, ``steps``, ``seconds`` and, if the run
        validated at its last step, ``final_val_loss``.
    """
    ft_cfg = finetune_config(cfg, pretrained, attention)
    run_dir = Path(ft_cfg.run_dir)
    # Checkpoints and logs of an earlier demo run would otherwise mix with this one's.
    if run_dir.exists():
        shutil.rmtree(run_dir)
    name = f"T3 ({cfg.t3.name})" if attention == "t3" else "dense (the control)"
    logger.info(
        "stage %d/4: %s fine-tune at %dx%dx%d, %d steps, from %s",
        2 if attention == "t3" else 3,
        name,
        cfg.data.height,
        cfg.data.width,
        cfg.data.num_frames,
        cfg.trainer.max_steps,
        pretrained,
    )
    start = time.perf_counter()
    export, metrics = _run_training(ft_cfg)
    info = {
        "run_dir": str(run_dir),
        "export": str(export),
        "steps": int(cfg.trainer.max_steps),
        "seconds": time.perf_counter() - start,
    }
    # The run's own held-out loss after its last step, when it validated there: the same set and noise as
    # the comparison, so it must equal the <attention>_after_ft row.
    if cfg.validation.every_n_steps and cfg.trainer.max_steps % cfg.validation.every_n_steps == 0:
        info["final_val_loss"] = metrics.get("val/loss")
    return export, info


# --- entry ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _torch_threads(num_threads: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_demo(cfg: DictConfig) -> dict[str, Any]:
    """Pretrain dense (cached), fine-tune T3 and dense, compare, and write the results.

    Args:
        cfg: The composed training config of ``experiment=demo``.

    Returns:
        The summary written to ``results.json``: ``results`` (`t3.demo.evaluation.evaluate`), ``pretrain``
        (``cached``, ``run_dir`` ...), ``finetune`` (``{"t3": ..., "dense": ...}``), ``timings_s``,
        ``outputs`` (paths), ``table`` and ``control_table`` (Markdown).

    Raises:
        t3.config.ConfigError: A bad ``demo`` setting, before anything trains.
    """
    from t3.io import write_json_atomic, write_text_atomic

    start = time.perf_counter()
    cfg, demo = demo_settings(cfg)
    out_dir = Path(cfg.run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _torch_threads(demo.num_threads):
        if demo.fast:
            logger.info("demo.fast=true: every stage in miniature (a smoke run; the numbers mean nothing)")
        pretrained, pre_info = pretrain(cfg, demo)
        finetuned, ft_info = {}, {}
        for attention in FINETUNES:
            finetuned[attention], ft_info[attention] = finetune(cfg, pretrained, attention)
        logger.info(
            "stage 4/4: evaluating dense and T3, before and after fine-tuning, at %sx%s",
            cfg.data.height,
            cfg.data.width,
        )
        eval_start = time.perf_counter()
        results, generated, reference = evaluate(cfg, demo, pretrained, finetuned)
        eval_seconds = time.perf_counter() - eval_start
        videos = write_videos(out_dir / "videos", cfg, demo, reference, generated)

    pre = demo.pretrain
    summary: dict[str, Any] = {
        "fast": demo.fast,
        "results": results,
        "pretrain": {
            **{k: pre_info[k] for k in ("cached", "run_dir", "export", "key", "seconds")},
            "size": f"{pre.height}x{pre.width}x{cfg.data.num_frames}",
            "steps": pre.steps,
        },
        "finetune": {a: {**info, "size": results["size"]} for a, info in ft_info.items()},
        "timings_s": {
            "pretrain": pre_info["seconds"],
            **{f"finetune_{a}": info["seconds"] for a, info in ft_info.items()},
            "evaluate": eval_seconds,
        },
        "outputs": {
            "markdown": str(out_dir / "results.md"),
            "json": str(out_dir / "results.json"),
            "plot": str(out_dir / "demo.png"),
            "videos": [str(p) for p in videos],
        },
        "table": results_table(results),
        "control_table": control_table(results),
    }
    write_plot(out_dir / "demo.png", summary, reference, generated)
    summary["timings_s"]["total"] = time.perf_counter() - start
    write_text_atomic(out_dir / "results.md", results_markdown(summary))
    write_json_atomic(out_dir / "results.json", summary)

    logger.info(
        "demo results at %s (%d held-out videos; %s is a random-feature Fréchet distance, NOT I3D-FVD; "
        "floor %.4g):\n%s",
        results["size"],
        results["num_heldout"],
        FD_NAME,
        results["fd"]["floor_train_vs_heldout"],
        summary["table"],
    )
    logger.info(
        "T3 vs dense, both fine-tuned the same way (the quality gap beside the cost ratio):\n%s",
        summary["control_table"],
    )
    t = summary["timings_s"]
    logger.info(
        "demo done in %.0f s (pretrain %s, fine-tunes T3 %.0f s and dense %.0f s, evaluation %.0f s); "
        "outputs in %s",
        t["total"],
        "cached" if pre_info["cached"] else f"{pre_info['seconds']:.0f} s",
        t["finetune_t3"],
        t["finetune_dense"],
        eval_seconds,
        out_dir,
    )
    return summary


def main(cfg: DictConfig) -> float:
    """The demo experiment's ``entry`` (`train.py`): `run_demo`; returns T3's held-out loss after fine-tuning."""
    summary = run_demo(cfg)
    (row,) = [r for r in summary["results"]["rows"] if r["name"] == "t3_after_ft"]
    return float(row["heldout_loss"])

"""Checkpoints on disk: checksums, the checkpoint a rerun resumes from, and starting a run folder over.

**Checksums.** Every checkpoint save (step checkpoints, SLURM pre-emption saves) is followed, on global
rank 0, by a file beside it, ``<checkpoint>.sha256.json``: the step, the run's training digest
(`training_digest`) with the settings it covers, and the sha256 of every file of the checkpoint (one for
Lightning's single file, each file of a DeepSpeed or FSDP2 checkpoint folder). It is written last, so a
checkpoint without one is a save that did not finish. `ChecksummedTrainer` writes it; the step
checkpoint callback keeps the newest ``checkpoint.keep`` checkpoints and removes a checksum file with
its checkpoint.

**Resuming.** `find_resume_checkpoint` verifies the candidates (``checkpoints/*.ckpt`` and the
``hpc_ckpt_<n>.ckpt`` of SLURM pre-emption) newest first and takes the first intact one; each newer one
that is not (truncated, a flipped byte, an unfinished save) is named in one log line and moved to
``checkpoints/damaged/`` (never deleted). The checkpoint's training digest must equal the current
config's: a rerun with other settings under the same run folder is refused in one line that names the
changed settings, unless ``resume_changed_config=true``.

**The training digest** covers the settings that change what is trained: the model and its T3
schedule, the data source and reader settings, batch, finetune, optim, objective, EMA, seed, and the
trainer's numerics (accelerator, precision, clipping, determinism) and strategy. It leaves out where
things go and what is only recorded or checked (`UNTRAINED_KEYS`, `UNTRAINED_NAMES`): paths of every
kind (outputs, caches, weights and data; a resumed run takes its weights from the checkpoint, and staged
data may move), logging, checkpointing, export, validation, the resume and dry-run switches, the stop
thresholds, the GPU, node and dataloader-worker counts (a requeued job may get other ones; the global
batch stays fixed, as the sweep folder names assume), and ``trainer.max_steps`` (a longer run continues
the same one; a cosine schedule's length enters through its effective ``optim.decay_steps``).

**Starting over.** ``resume=false`` moves the previous run's outputs (`RUN_OUTPUTS`: checkpoints,
exports, logs, summary, wandb id) into ``previous_runs/<UTC time>/`` inside the run folder, so the new
run starts clean and nothing is lost.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from t3.config import ConfigError
from t3.io import sha256_file, write_json_atomic
from t3.summary import PREVIOUS_RUNS_DIR, config_digest

__all__ = [
    "CHECKSUM_SUFFIX",
    "RUN_OUTPUTS",
    "ChecksummedTrainer",
    "ResumeRefusedError",
    "checksum_file",
    "find_resume_checkpoint",
    "move_run_aside",
    "newest_checkpoint",
    "training_digest",
    "verify_checkpoint",
    "write_checksums",
]

logger = logging.getLogger(__name__)


class ResumeRefusedError(ConfigError):
    """The run folder holds checkpoints this config must not resume (other settings, or none intact).

    Nothing has run, so the folder's ``summary.json`` stays that of the run it holds."""


CHECKSUM_SUFFIX = ".sha256.json"
DAMAGED_DIR = "damaged"

#: Dotted keys of the training config that do not change what is trained (see the module docstring).
UNTRAINED_KEYS = (
    "experiment_name",
    "run_dir",
    "paths",
    "logger",
    "tags",
    "checkpoint",
    "export",
    "validation",
    "data.val",
    "data.max_skipped_fraction",
    "data.num_workers",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.log_every_n_steps",
    "trainer.max_steps",
    "resume",
    "resume_changed_config",
    "dry_run",
    "dry_run_tflops",
    "dry_run_num_gpus",
    "max_consecutive_bad_steps",
)
#: Key names left out wherever they appear (copies of the model config inside data readers included).
UNTRAINED_NAMES = (
    "dit_path",
    "init_from",
    "vae_path",
    "text_encoder_path",
    "urls_or_dir",
    "video_list",
    "out_dir",
    "cache_dir",
)
#: What a run writes into its folder; ``resume=false`` moves these aside. Hydra's own ``.hydra/`` and the
#: log file belong to the starting job and stay.
RUN_OUTPUTS = (
    "checkpoints",
    "hpc_ckpt_*",
    "export",
    "export_ema",
    "csv",
    "samples",
    "summary.json",
    "wandb_id.txt",
    "wandb",
)


# --- the training digest ----------------------------------------------------------------------------------


def _drop_names(node: Any) -> Any:
    if isinstance(node, Mapping):
        return {k: _drop_names(v) for k, v in node.items() if k not in UNTRAINED_NAMES}
    if isinstance(node, list):
        return [_drop_names(v) for v in node]
    return node


def training_digest(cfg: DictConfig) -> tuple[str, dict[str, Any]]:
    """The digest of the settings that change what is trained, and those settings (resolved).

    Returns:
        ``(digest, settings)``: 16 hex digits, and the resolved settings it covers (stored with every
        checkpoint, so that a refused resume can name what changed).
    """
    settings: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    settings.pop("hydra", None)
    optim = settings.get("optim") or {}
    if optim.get("schedule") == "cosine" and optim.get("decay_steps") is None:
        optim["decay_steps"] = cfg.trainer.max_steps  # the schedule's length is what trains differently
    for key in UNTRAINED_KEYS:
        *parents, last = key.split(".")
        node: Any = settings
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    settings = _drop_names(settings)
    return config_digest(settings), settings


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, Mapping):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): node}


def _changes(old: Mapping[str, Any], new: Mapping[str, Any], limit: int = 3) -> str:
    """``"optim.lr: 2e-05 -> 0.0001; seed: 42 -> 1"``: the first ``limit`` settings that differ."""
    before, after = _flatten(old), _flatten(new)
    keys = sorted(k for k in set(before) | set(after) if before.get(k, "<unset>") != after.get(k, "<unset>"))
    parts = [f"{k}: {before.get(k, '<unset>')!r} -> {after.get(k, '<unset>')!r}" for k in keys[:limit]]
    more = f"; and {len(keys) - limit} more" if len(keys) > limit else ""
    return "; ".join(parts) + more if parts else "settings not recorded"


# --- checksums --------------------------------------------------------------------------------------------


def checksum_file(checkpoint: str | os.PathLike) -> Path:
    """Where the checksums of ``checkpoint`` (a file or a folder) are kept: beside it."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name + CHECKSUM_SUFFIX)


def _files(checkpoint: Path) -> list[Path]:
    if checkpoint.is_dir():
        return sorted(p for p in checkpoint.rglob("*") if p.is_file())
    return [checkpoint]


def write_checksums(
    checkpoint: str | os.PathLike, *, step: int, digest: str, settings: Mapping[str, Any] | None = None
) -> Path:
    """Hash every file of a complete checkpoint and write ``<checkpoint>.sha256.json`` (atomically).

    Args:
        checkpoint: A checkpoint file, or a checkpoint folder (DeepSpeed, FSDP2).
        step: Its optimizer step.
        digest: The run's training digest (`training_digest`).
        settings: The settings the digest covers.
    """
    checkpoint = Path(checkpoint)
    files = {str(f.relative_to(checkpoint.parent)): sha256_file(f) for f in _files(checkpoint)}
    record = {"step": step, "training_digest": digest, "settings": dict(settings or {}), "files": files}
    return write_json_atomic(checksum_file(checkpoint), record)


def verify_checkpoint(checkpoint: str | os.PathLike) -> tuple[dict[str, Any] | None, str | None]:
    """Check a checkpoint against its checksum file.

    Returns:
        ``(record, None)`` for an intact checkpoint (the checksum file's content), else ``(record or None,
        why)``: no checksum file (an unfinished save), a file missing, added or of another sha256.
    """
    checkpoint = Path(checkpoint)
    try:
        record = json.loads(checksum_file(checkpoint).read_text())
        expected = dict(record["files"])
    except FileNotFoundError:
        return None, f"no checksum file {checksum_file(checkpoint).name} (the save did not finish)"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return None, f"unreadable checksum file {checksum_file(checkpoint).name} ({err})"
    found = (
        {str(f.relative_to(checkpoint.parent)) for f in _files(checkpoint)} if checkpoint.exists() else set()
    )
    missing = sorted(set(expected) - found)
    if missing:
        return record, f"{missing[0]} is missing"
    extra = sorted(found - set(expected))
    if extra:
        return record, f"{extra[0]} is not in its checksum file"
    for name, sha in sorted(expected.items()):
        try:
            actual = sha256_file(checkpoint.parent / name)
        except OSError as err:
            return record, f"{name} cannot be read ({err})"
        if actual != sha:
            return (
                record,
                f"{name} has sha256 {actual[:12]}..., saved as {sha[:12]}... (truncated or corrupted)",
            )
    return record, None


# --- which checkpoint to resume ---------------------------------------------------------------------------


def _candidates(run_dir: Path) -> list[Path]:
    """Checkpoints of a run folder (not ``last.ckpt``, which links one of them), newest first.

    Finished saves are ordered by their step (then time); unfinished ones (no checksum file) first, as
    they can only be the newest attempt.
    """
    found = [p for p in (run_dir / "checkpoints").glob("*.ckpt") if not p.name.startswith("last")]
    found += list(run_dir.glob("hpc_ckpt_*.ckpt"))

    def key(path: Path) -> tuple[int, float, float]:
        try:  # another rank may be moving a damaged one aside meanwhile
            mtime = path.stat().st_mtime
        except OSError:
            mtime = 0.0
        try:
            step = json.loads(checksum_file(path).read_text())["step"]
        except (OSError, ValueError, KeyError, TypeError):
            return (1, 0.0, mtime)
        return (0, float(step), mtime)

    return sorted(found, key=key, reverse=True)


def newest_checkpoint(run_dir: str | os.PathLike) -> str | None:
    """The newest checkpoint file or folder of a run folder, unverified (for run summaries)."""
    run_dir = Path(run_dir)
    candidates = [
        p for p in [run_dir / "checkpoints" / "last.ckpt", *run_dir.glob("hpc_ckpt_*.ckpt")] if p.exists()
    ]
    if not candidates:
        return None
    return str(max(candidates, key=lambda p: p.resolve().stat().st_mtime))


def _move_damaged(checkpoint: Path, checkpoints_dir: Path) -> None:
    target = checkpoints_dir / DAMAGED_DIR
    target.mkdir(parents=True, exist_ok=True)
    for path in (checkpoint, checksum_file(checkpoint)):
        if path.exists():
            os.replace(path, _free_name(target / path.name))


def _free_name(path: Path) -> Path:
    candidate, n = path, 1
    while candidate.exists():
        candidate, n = path.with_name(f"{path.name}.{n}"), n + 1
    return candidate


def find_resume_checkpoint(
    run_dir: str | os.PathLike,
    digest: str | None = None,
    *,
    settings: Mapping[str, Any] | None = None,
    allow_changed_config: bool = False,
) -> str | None:
    """The newest intact checkpoint of a run folder, or None when the run has none yet.

    Candidates are verified newest first (`verify_checkpoint`); each one that fails is named in one
    warning and, on global rank 0, moved to ``checkpoints/damaged/``. Every rank verifies for itself, so
    all ranks pick the same checkpoint without talking to each other.

    Args:
        run_dir: The run folder.
        digest: The current training digest; None skips the settings check.
        settings: The current settings (`training_digest`), to name what changed.
        allow_changed_config: Resume a checkpoint of other settings (with a warning) instead of refusing.

    Raises:
        ResumeRefusedError: One line: the checkpoint was trained with other settings, or checkpoints exist but
            none is intact (nothing is moved then; ``resume=false`` starts over).
    """
    run_dir = Path(run_dir)
    failed: list[tuple[Path, str]] = []
    damaged = False  # a finished save that fails its checksums (not merely an unfinished one)
    chosen: tuple[Path, dict[str, Any]] | None = None
    for candidate in _candidates(run_dir):
        record, problem = verify_checkpoint(candidate)
        if problem is None:
            assert record is not None
            chosen = (candidate, record)
            break
        failed.append((candidate, problem))
        damaged = damaged or checksum_file(candidate).exists()
    if chosen is None and damaged:
        listing = "; ".join(f"{path.name}: {problem}" for path, problem in failed)
        raise ResumeRefusedError(
            f"no intact checkpoint to resume in {run_dir}: {listing}; rerun with resume=false to start over "
            f"(the old run is moved to {PREVIOUS_RUNS_DIR}/, not deleted)"
        )
    first = rank_zero_only.rank == 0  # one rank moves the damaged ones and says so
    for path, problem in failed:
        if first:
            _move_damaged(path, run_dir / "checkpoints")
            logger.warning(
                "checkpoint %s is not usable: %s; moved to checkpoints/%s/", path, problem, DAMAGED_DIR
            )
    if chosen is None:
        return None  # only unfinished saves: as if the run had never saved
    path, record = chosen
    if failed and first:
        logger.warning("resuming from %s (step %d), the newest intact checkpoint", path, record["step"])
    if digest is not None and record.get("training_digest") != digest:
        what = _changes(record.get("settings") or {}, settings or {})
        if not allow_changed_config:
            raise ResumeRefusedError(
                f"{path} was trained with other settings ({what}); rerun with the same settings, "
                "resume=false to start over (the old run is moved aside), or resume_changed_config=true "
                "to continue with the new ones"
            )
        if first:
            logger.warning("resuming %s with changed settings (resume_changed_config=true): %s", path, what)
    return str(path)


# --- starting over ----------------------------------------------------------------------------------------


def move_run_aside(run_dir: str | os.PathLike) -> Path | None:
    """Move a previous run's outputs (`RUN_OUTPUTS`) to ``previous_runs/<UTC time>/`` in the run folder.

    Returns:
        The folder they were moved to, or None when there was nothing to move.
    """
    run_dir = Path(run_dir)
    outputs = sorted({p for pattern in RUN_OUTPUTS for p in run_dir.glob(pattern)})
    if not outputs:
        return None
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H-%M-%SZ")
    target = _free_name(run_dir / PREVIOUS_RUNS_DIR / stamp)
    target.mkdir(parents=True)
    for path in outputs:
        os.replace(path, target / path.name)
    return target


class ChecksummedTrainer(L.Trainer):
    """Lightning's ``Trainer`` whose every checkpoint save is followed by its checksum file (on rank 0).

    Every save goes through ``Trainer.save_checkpoint``: the step checkpoints and Lightning's SLURM
    pre-emption save alike. The checkpoint is complete on every rank when the parent returns (it ends
    with a barrier), so rank 0 can hash all of its files (on a file system the ranks share).

    Args:
        training_digest: ``(digest, settings)`` of `training_digest`, recorded with every checkpoint.
        **kwargs: ``Trainer`` arguments.
    """

    def __init__(self, *args: Any, training_digest: tuple[str, dict[str, Any]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.training_digest = training_digest

    def save_checkpoint(
        self, filepath: Any, weights_only: bool | None = None, storage_options: Any = None
    ) -> None:
        super().save_checkpoint(filepath, weights_only, storage_options)
        if self.is_global_zero:
            digest, settings = self.training_digest
            write_checksums(filepath, step=self.global_step, digest=digest, settings=settings)

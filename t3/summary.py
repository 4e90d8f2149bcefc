"""Run summaries: one machine-readable ``summary.json`` per training or evaluation run.

Every run (a single job, or one job of a Hydra sweep) writes its summary into its output folder:
what ran (experiment, overrides, a digest of the resolved config), how it ended (status, error),
its final metrics, its speed figures (with the device they were measured on) and the checkpoint it
produced. ``python -m t3.report <sweep dir>`` collects them into tables.

The file is written atomically (temporary name, then rename), so a reader never sees half of it.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from t3.io import write_json_atomic

SUMMARY_NAME = "summary.json"
#: Inside a run folder, where ``resume=false`` moves a previous run's outputs (`t3.training.checkpoints`);
#: reports do not count the summaries kept there as runs.
PREVIOUS_RUNS_DIR = "previous_runs"
# 2: ``step`` (the optimizer step a training run's results belong to) and ``results_from``.
SCHEMA_VERSION = 2
STATUSES = ("completed", "failed")


def config_digest(resolved_config: Mapping[str, Any] | str) -> str:
    """sha256 (first 16 hex digits) of a resolved config, as canonical JSON or given text."""
    text = (
        resolved_config
        if isinstance(resolved_config, str)
        else json.dumps(resolved_config, sort_keys=True, default=str)
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def describe_error(err: BaseException, max_chars: int = 600) -> str:
    """One line for a summary's ``error``: the root cause first, then the exception that wrapped it.

    Wrappers such as Hydra's ``InstantiationException`` ("Error in call to target ...:") say where a
    failure surfaced, their ``__cause__`` says what went wrong (``no .tar shards in ...``); a report
    that shows only the wrapper's first line is useless, so the root cause leads.
    """

    def first_line(e: BaseException) -> str:
        text = str(e).strip()
        line = text.splitlines()[0].strip() if text else ""
        return f"{type(e).__name__}: {line}" if line else type(e).__name__

    chain = [err]
    while chain[-1].__cause__ is not None and chain[-1].__cause__ not in chain:
        chain.append(chain[-1].__cause__)
    text = first_line(chain[-1])
    if len(chain) > 1:
        text += f" (raised as {first_line(err)})"
    return text if len(text) <= max_chars else text[: max_chars - 3] + "..."


def _plain(value: Any) -> Any:
    """JSON-safe copy: tensors and numpy scalars become floats; NaN/inf become None."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        try:
            value = value.item()
        except (ValueError, RuntimeError):
            return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    return str(value)


def write_run_summary(
    run_dir: str | os.PathLike,
    *,
    task: str,
    status: str,
    experiment: str | None,
    overrides: list[str],
    resolved_config: Mapping[str, Any] | str,
    metrics: Mapping[str, Any] | None = None,
    speed: Mapping[str, Any] | None = None,
    checkpoint: str | None = None,
    error: str | None = None,
    started: float | None = None,
    step: int | None = None,
    results_from: str | None = None,
) -> Path:
    """Write ``run_dir/summary.json``.

    Args:
        run_dir: the run's output folder.
        task: ``"train"`` or ``"eval"``.
        status: ``"completed"`` or ``"failed"``.
        experiment: experiment name (``experiment=...``), if any.
        overrides: the command-line overrides of this run (what distinguishes it within a sweep).
        resolved_config: the resolved config (mapping or YAML text), for the digest.
        metrics: final metrics (``val/loss``, ``fvd_i3d``, ...).
        speed: speed figures (``perf/step_time_s``, ...) including ``device``.
        checkpoint: path of the exported checkpoint.
        error: one line describing the failure, for ``status="failed"``.
        started: start time (``time.time()``), to record the duration.
        step: for training, the optimizer step the metrics belong to (the step of the final checkpoint).
        results_from: when this run trained nothing (a rerun of a finished run), the ``finished`` time of
            the earlier summary whose metrics and speed it repeats.
    """
    if status not in STATUSES:
        raise ValueError(f"summary status must be one of {STATUSES}, got {status!r}")
    now = _dt.datetime.now(_dt.UTC)
    payload = {
        "schema_version": SCHEMA_VERSION,
        "task": task,
        "status": status,
        "experiment": experiment,
        "overrides": list(overrides),
        "config_digest": config_digest(resolved_config),
        "metrics": _plain(dict(metrics or {})),
        "speed": _plain(dict(speed or {})),
        "checkpoint": checkpoint,
        "step": step,
        "results_from": results_from,
        "error": error,
        "finished": now.isoformat(timespec="seconds"),
        "duration_s": None if started is None else round(now.timestamp() - started, 3),
        "host": platform.node(),
    }
    return write_json_atomic(Path(run_dir) / SUMMARY_NAME, payload)


def read_run_summary(path: str | os.PathLike) -> dict[str, Any]:
    """Read a ``summary.json`` (a file or the run folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / SUMMARY_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"run summary not found: {path}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"run summary {path} is not valid JSON: {err}") from None
    if not isinstance(data, dict) or data.get("status") not in STATUSES:
        raise ValueError(f"run summary {path} has no valid 'status' (expected one of {STATUSES})")
    return data

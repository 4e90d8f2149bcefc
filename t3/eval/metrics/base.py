"""What every evaluation metric shares: its result record, the skip rule, weight checks and frame choice.

Every metric is named after what it measures and with what (``fvd_i3d``, ``vtc_clip``, ``vqa_dover``):
none of them is the paper's unnamed "VQA"/"VTC" number. A metric whose weights are not given, or that
t3 does not implement faithfully, reports ``status="skipped"`` with a one-line reason. It never falls
back to a different model under the same name.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "MetricResult",
    "WeightsError",
    "resolve_weights",
    "skipped",
    "uniform_indices",
]

logger = logging.getLogger(__name__)


class WeightsError(ValueError):
    """Given weights are unusable (wrong hash, wrong kind of file)."""


@dataclass
class MetricResult:
    """The outcome of one metric.

    Attributes:
        name: Explicit metric name, e.g. ``fvd_i3d`` (also the key in ``results.json``).
        value: The score, or None when skipped.
        status: ``ok`` or ``skipped``.
        message: Why it was skipped, or notes on the value.
        num_generated: Generated videos (or clips, for tiled metrics) that entered the value.
        num_reference: Reference videos (or clips) that entered the value (0 for no-reference metrics).
        protocol: Everything needed to reproduce the value (model, hash, frames, resize, ...).
        per_video: Optional per-video scores, keyed by video file name.
    """

    name: str
    value: float | None
    status: Literal["ok", "skipped"]
    message: str = ""
    num_generated: int = 0
    num_reference: int = 0
    protocol: dict[str, Any] = field(default_factory=dict)
    per_video: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def skipped(name: str, reason: str, **protocol: Any) -> MetricResult:
    """A skipped result; the message reads ``"<name>: skipped: <reason>"`` and is logged as a warning."""
    message = f"{name}: skipped: {reason}"
    logger.warning(message)
    return MetricResult(name=name, value=None, status="skipped", message=message, protocol=dict(protocol))


def resolve_weights(key: str, path: str | os.PathLike | None) -> Path | str:
    """The weights path of a metric, or the reason it cannot be used.

    Args:
        key: Config key holding the path (``metrics.fvd_i3d.weights``), for the message.
        path: The configured path (None = not given).

    Returns:
        The existing `Path`, or a reason string (``"no weights (metrics.x.weights is null)"``,
        ``"weights not found at /p (metrics.x.weights)"``) to pass to `skipped`.
    """
    if path is None or str(path) == "":
        return f"no weights ({key} is null)"
    path = Path(path).expanduser()
    if not path.exists():
        return f"weights not found at {path} ({key})"
    return path


def uniform_indices(num_frames: int, count: int) -> list[int]:
    """``count`` frame indices spread evenly over ``num_frames`` frames, first and last included."""
    if count >= num_frames:
        return list(range(num_frames))
    if count == 1:
        return [num_frames // 2]
    return [round(i * (num_frames - 1) / (count - 1)) for i in range(count)]

"""The T3 record of a DiT: which schedule its weights were trained with, and where they come from.

T3 changes no weights, so nothing in a checkpoint's tensors says which attention pattern they were
fine-tuned for: a dense-trained checkpoint evaluated with a windowed schedule (or the reverse) runs
without complaint and gives wrong numbers. The record says it, beside the weights, in the checkpoint's
config under the private key ``_t3_record`` (diffusers keeps private config keys out of the model's
``__init__`` and carries them through ``from_pretrained``/``save_pretrained``):

    {"schema_version": 1,
     "schedule": {"name": "wan21_windows", "rules": [{"window": [1, null, null], "branches": [...]}, ...],
                  "share_identical_branches": true, "description": "..."},
     "model_preset": "wan2.1-t2v-1.3b",                     # null when unknown
     "resolution": {"height": 720, "width": 1280, "frames": 81},   # trained at; null outside training
     "step": 5000,                                          # optimizer step of the weights; null outside training
     "config_digest": "3f2a...",                            # the training run's summary.json config_digest
    }

Where it lives: ``config.json`` of a diffusers folder, ``config.json`` of a Wan folder, or the config in the
safetensors metadata of a single Wan file (`t3.models.save_dit` writes all three; `t3.models.read_record`
reads them). `t3.transform` puts a record (schedule and preset) on the model's config, so a transformed
model saved with diffusers' ``save_pretrained`` carries it too; training exports add the size, the step
and the config digest.

Who reads it: `t3.transform(model)` without a schedule, `t3.models.load_dit` and ``eval.py`` use the
recorded schedule by default; an explicit different schedule is refused (`ScheduleConflictError`) unless
the caller passes ``allow_schedule_change`` (`choose_schedule` is that one rule).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from t3.attention import Schedule

__all__ = ["RECORD_KEY", "SCHEMA_VERSION", "ScheduleConflictError", "T3Record", "choose_schedule"]

logger = logging.getLogger(__name__)

#: The config key holding the record (private: diffusers never passes it to the model's ``__init__``).
RECORD_KEY = "_t3_record"
SCHEMA_VERSION = 1


class ScheduleConflictError(ValueError):
    """An explicit T3 schedule differs from the one the checkpoint was trained with (one line)."""


@dataclass(frozen=True)
class T3Record:
    """What a DiT's weights were trained with.

    Attributes:
        schedule: The T3 schedule (``dense`` for full attention).
        model_preset: The `t3.models.presets` name of the architecture, if known.
        resolution: ``(height, width, frames)`` the weights were trained at, if known.
        step: The optimizer step of the weights, if known.
        config_digest: ``config_digest`` of the training run's ``summary.json``, if known.
    """

    schedule: Schedule
    model_preset: str | None = None
    resolution: tuple[int, int, int] | None = None
    step: int | None = None
    config_digest: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The record as plain JSON values (the format in the module docstring)."""
        h_w_f = self.resolution
        return {
            "schema_version": SCHEMA_VERSION,
            "schedule": self.schedule.as_dict(),
            "model_preset": self.model_preset,
            "resolution": None
            if h_w_f is None
            else dict(zip(("height", "width", "frames"), h_w_f, strict=True)),
            "step": self.step,
            "config_digest": self.config_digest,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str) -> T3Record:
        """Read `as_dict`'s format; a bad record raises ValueError naming ``source`` and the field."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: T3 record must be an object, got {type(data).__name__}")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(
                f"{source}: T3 record schema_version {version} is not supported (this t3 reads {SCHEMA_VERSION})"
            )
        try:
            schedule = Schedule.from_dict(dict(data["schedule"]))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{source}: T3 record: schedule: {err}") from None
        resolution = data.get("resolution")
        try:
            size = (
                None
                if resolution is None
                else tuple(int(resolution[k]) for k in ("height", "width", "frames"))
            )
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{source}: T3 record: resolution must be {{height, width, frames}}") from None
        return cls(
            schedule=schedule,
            model_preset=data.get("model_preset"),
            resolution=size,  # type: ignore[arg-type]
            step=None if data.get("step") is None else int(data["step"]),
            config_digest=data.get("config_digest"),
        )

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, source: str = "model config") -> T3Record | None:
        """The record in a (diffusers or Wan) config, or None when it has none."""
        data = config.get(RECORD_KEY)
        return None if data is None else cls.from_dict(data, source=source)


def choose_schedule(
    record: T3Record | None,
    requested: Schedule | None,
    *,
    allow_change: bool = False,
    source: str = "the checkpoint",
) -> Schedule | None:
    """The schedule to run weights with: ``requested`` if given, else the recorded one (None if neither).

    Raises:
        ScheduleConflictError: ``requested`` computes other attention than the recorded schedule and
            ``allow_change`` is False.
    """
    if requested is None:
        return None if record is None else record.schedule
    if record is not None and not record.schedule.same_attention(requested):
        if not allow_change:
            raise ScheduleConflictError(
                f"{source} was trained with T3 schedule {record.schedule.name!r}, not {requested.name!r}: "
                f"leave the schedule out to use {record.schedule.name!r}, or pass allow_schedule_change=True "
                f"(eval.py: allow_schedule_change=true) to run it with {requested.name!r} anyway"
            )
        logger.warning(
            "%s was trained with T3 schedule %r; running it with %r as asked (allow_schedule_change)",
            source, record.schedule.name, requested.name,
        )  # fmt: skip
    return requested

"""The videos of an eval run: one job per prompt and seed, its two files, and whether it is complete.

Shared by the generation stage (which makes the missing ones) and the score stage (which reads them). File
names come from `t3.generate.video_file_name`; see `t3.eval.generate_stage` for how the files are written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from t3.eval.prompts import PromptEntry, shard_range
from t3.generate import video_file_name
from t3.video_io import VideoIOError, video_info

__all__ = ["VideoJob", "completed_record", "is_complete", "shard_jobs", "video_jobs"]


@dataclass(frozen=True)
class VideoJob:
    """One video to make: a prompt, a seed and its two files."""

    entry: PromptEntry
    seed: int
    mp4: Path
    record: Path

    @property
    def name(self) -> str:
        return self.mp4.name


def video_jobs(
    entries: Sequence[PromptEntry], seeds: Sequence[int], out_dir: str | os.PathLike
) -> list[VideoJob]:
    """Every (prompt, seed) video of ``entries`` in prompt-major order."""
    out = Path(out_dir)
    jobs = []
    for entry in entries:
        for seed in seeds:
            mp4 = out / video_file_name(entry.index, seed)
            jobs.append(VideoJob(entry=entry, seed=int(seed), mp4=mp4, record=mp4.with_suffix(".json")))
    return jobs


def shard_jobs(
    entries: Sequence[PromptEntry],
    seeds: Sequence[int],
    out_dir: str | os.PathLike,
    shard_index: int,
    num_shards: int,
) -> list[VideoJob]:
    """The jobs of one shard: all seeds of its contiguous range of prompts."""
    part = shard_range(len(entries), shard_index, num_shards)
    return video_jobs([entries[i] for i in part], seeds, out_dir)


def completed_record(job: VideoJob) -> dict[str, Any] | None:
    """The job's record if the job is complete, else None.

    Complete means: the mp4 and the record both exist and agree on the frame count. The record is
    written atomically after the mp4, so a record never describes a video still being written.
    """
    if not job.mp4.is_file():
        return None
    try:
        record = json.loads(job.record.read_text(encoding="utf-8"))
        frames = video_info(job.mp4).frames
    except (OSError, json.JSONDecodeError, VideoIOError):
        return None
    return record if isinstance(record, dict) and record.get("frames") == frames else None


def is_complete(job: VideoJob) -> bool:
    """Whether the job's mp4 and record both exist and agree on the frame count."""
    return completed_record(job) is not None

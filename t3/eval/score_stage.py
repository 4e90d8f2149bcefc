"""The scoring stage: metrics of the generated videos (and of the references, for FVD).

Reads every complete video of the run (`t3.eval.generate_stage.is_complete`) and, where the benchmark
has a data root, the reference video named by each prompt's ``data_file``. For t3's own metrics each video
is decoded once, only at the frames some metric needs (decord); ``vtc_viclip`` and ``vqa_dover*`` run the
upstream code of local checkouts, which reads the mp4s itself. Writes ``results.json`` (atomically),
``results.md`` and, when enabled, a wandb table (``eval/results``) plus one scalar per metric
(``eval/<name>``).

Metrics and their protocols: see `t3.eval.metrics`. None of them is claimed to be the T3 paper's number.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from t3.eval.jobs import VideoJob, completed_record, is_complete, video_jobs
from t3.eval.metrics import (
    FVD_NAME,
    FVD_TILED_NAME,
    METRIC_NAMES,
    VQA_DOVER_AESTHETIC_NAME,
    VQA_DOVER_NAME,
    VQA_DOVER_TECHNICAL_NAME,
    VTC_CLIP_NAME,
    VTC_VICLIP_NAME,
    ClipConsistency,
    DoverQuality,
    DoverSettings,
    FrechetVideoDistance,
    I3DFeatures,
    MetricResult,
    ViClipConsistency,
    load_i3d,
    skipped,
)
from t3.eval.metrics.base import resolve_weights
from t3.eval.metrics.fvd import clip_indices, random_tiles, resized_clip
from t3.eval.prompts import PromptEntry
from t3.eval.settings import FVDSettings, ScoreSettings, resolve_device
from t3.io import write_json_atomic, write_text_atomic
from t3.models import get_spec
from t3.video_io import frame_count, read_frames, video_info

__all__ = ["results_markdown", "run_scoring"]

logger = logging.getLogger(__name__)

NOT_THE_PAPER = (
    "Metrics are named after their models; none is claimed to be the T3 paper's number: the paper names "
    "neither its VQA nor its VTC model (vqa_dover, DOVER's fused score x 100, is on its VQA scale) and "
    "reports no FVD."
)


@dataclass
class _Video:
    """A video to score: generated (with its job) or reference."""

    path: Path
    key: list[int]  # seeds the tile positions: [prompt index, video seed, is_reference]
    prompt: str = ""
    fps: float = 0.0  # frame rate of its content (for a generated video, not the mp4's label)


class _FVDRun:
    """One FVD variant being accumulated: its metric, its batch of clips, and its counts."""

    def __init__(
        self,
        name: str,
        metric: FrechetVideoDistance,
        settings: FVDSettings,
        device: torch.device,
        sha256: str,
    ) -> None:
        self.name, self.metric, self.settings, self.device = name, metric, settings, device
        self.sha256 = sha256
        self.pending: dict[bool, list[torch.Tensor]] = {True: [], False: []}
        self.counts = {True: 0, False: 0}  # clips that entered the statistics
        self.left_out = {True: 0, False: 0}  # videos too short (or too small for the tiles)
        # Videos that entered the statistics, by the frame rate of their content.
        self.source_fps: dict[bool, Counter[float]] = {True: Counter(), False: Counter()}

    def add(self, clips: torch.Tensor, real: bool) -> None:
        self.pending[real].extend(clips)
        self.counts[real] += len(clips)
        if len(self.pending[real]) >= self.settings.batch_size:
            self.flush(real)

    def flush(self, real: bool) -> None:
        if self.pending[real]:
            self.metric.update(torch.stack(self.pending[real]).to(self.device), real=real)
            self.pending[real] = []


def _reference_videos(entries: Sequence[PromptEntry], data_root: str | os.PathLike | None) -> list[_Video]:
    """The reference videos named by the prompts; one-line error for the first missing file."""
    if data_root is None:
        return []
    root = Path(data_root)
    if not root.is_dir():
        raise FileNotFoundError(f"benchmark.data_root={str(root)!r}: no such folder")
    refs, seen = [], set()
    for entry in entries:
        if not entry.data_file or entry.data_file in seen:
            continue
        seen.add(entry.data_file)
        path = root / entry.data_file
        if not path.is_file():
            raise FileNotFoundError(
                f"reference video {path} (data_file of prompt {entry.index}) does not exist under benchmark.data_root"
            )
        fps = video_info(path).fps
        if not fps > 0:
            raise ValueError(f"reference video {path}: its container gives no frame rate; FVD needs one")
        refs.append(_Video(path=path, key=[entry.index, 0, 1], prompt=entry.prompt, fps=fps))
    return refs


def _generated_video(job: VideoJob) -> _Video:
    """A complete generated video, with the frame rate of its content from its record."""
    record = completed_record(job) or {}
    fps = record.get("content_fps")
    if fps is None and "model" in record:  # records written before content_fps was recorded
        fps = get_spec(record["model"]).frame_rate
    if fps is None:
        raise ValueError(
            f"{job.record}: no content_fps or model; cannot tell the frame rate of {job.mp4.name}"
        )
    return _Video(path=job.mp4, key=[job.entry.index, job.seed, 0], prompt=job.entry.prompt, fps=float(fps))


def _fvd_runs(
    settings: FVDSettings, refs: list[_Video], device: torch.device, results: dict[str, MetricResult]
) -> list[_FVDRun]:
    """Build the enabled FVD variants, or record why each is skipped."""
    names = [n for n, on in ((FVD_NAME, settings.enabled), (FVD_TILED_NAME, settings.tiled)) if on]
    for name in (FVD_NAME, FVD_TILED_NAME):
        if name not in names:
            results[name] = skipped(name, f"disabled (metrics.{name}.enabled=false)")
    if not names:
        return []
    weights = resolve_weights("metrics.fvd_i3d.weights", settings.weights)
    reason = weights if isinstance(weights, str) else None
    if reason is None and not refs:
        reason = "no reference videos (benchmark.data_root is null or the prompts have no data_file)"
    if reason is not None:
        for name in names:
            results[name] = skipped(name, reason)
        return []
    assert isinstance(weights, Path)
    detector, sha = load_i3d(weights, sha256=settings.sha256, device=device)
    feature = I3DFeatures(detector, settings.num_features)
    return [_FVDRun(name, FrechetVideoDistance(feature).to(device), settings, device, sha) for name in names]


def _feed_fvd(runs: list[_FVDRun], frames: np.ndarray | None, video: _Video, real: bool) -> None:
    """Add one video's clip (``frames``, or None if the video is too short) to every FVD variant."""
    for run in runs:
        size = run.settings.size
        if frames is None or (run.name == FVD_TILED_NAME and min(frames.shape[1:3]) < size):
            run.left_out[real] += 1
            logger.warning("%s: %s is too short or too small; left out", run.name, video.path)
            continue
        run.source_fps[real][video.fps] += 1
        if run.name == FVD_NAME:
            run.add(resized_clip(frames, size)[None], real)
        else:
            key = [run.settings.tile_seed, *video.key]
            run.add(random_tiles(frames, run.settings.tiles_per_video, key, size), real)


def _fvd_result(run: _FVDRun) -> MetricResult:
    for real in (True, False):
        run.flush(real)
    s = run.settings
    protocol = {
        **s.protocol(),
        "detector_path": s.weights,
        "detector_sha256": run.sha256,
        "videos_left_out": {"generated": run.left_out[False], "reference": run.left_out[True]},
        # Videos used, by the frame rate of their content; below `fps` their clips repeat frames.
        "source_fps": {
            side: {f"{fps:g}": n for fps, n in sorted(run.source_fps[real].items())}
            for side, real in (("generated", False), ("reference", True))
        },
    }
    if run.name == FVD_NAME:
        protocol["resize"] = f"squash to {s.size}x{s.size}, bilinear with antialiasing, no crop"
    else:
        protocol["tiles"] = (
            f"{s.tiles_per_video} tiles of {s.size}x{s.size} per video at full resolution, "
            f"positions from default_rng([{s.tile_seed}, prompt index, seed, is_reference])"
        )
    if run.counts[True] < 2 or run.counts[False] < 2:
        return skipped(run.name, f"needs >= 2 clips per side, got {run.counts[False]} generated and "
                       f"{run.counts[True]} reference", **protocol)  # fmt: skip
    value = float(run.metric.compute())
    logger.info(
        "%s = %.3f (%d generated, %d reference clips)", run.name, value, run.counts[False], run.counts[True]
    )
    return MetricResult(
        name=run.name,
        value=value,
        status="ok",
        message=f"{run.counts[False]} generated vs {run.counts[True]} reference clips; not comparable to FVD2048",
        num_generated=run.counts[False],
        num_reference=run.counts[True],
        protocol=protocol,
    )


def _clip_scorer(
    settings: ScoreSettings, device: torch.device, results: dict[str, MetricResult]
) -> ClipConsistency | None:
    if not settings.clip_enabled:
        results[VTC_CLIP_NAME] = skipped(VTC_CLIP_NAME, "disabled (metrics.vtc_clip.enabled=false)")
        return None
    weights = resolve_weights("metrics.vtc_clip.weights", settings.clip_weights)
    if isinstance(weights, str):
        results[VTC_CLIP_NAME] = skipped(VTC_CLIP_NAME, weights)
        return None
    return ClipConsistency(weights, num_frames=settings.clip_num_frames, device=device)


def _viclip_results(
    paths: tuple[Path, Path, Path] | str, complete: Sequence[VideoJob], device: torch.device
) -> dict[str, MetricResult]:
    """``vtc_viclip`` through VBench's own code, or skipped with the reason."""
    if isinstance(paths, str):
        return {VTC_VICLIP_NAME: skipped(VTC_VICLIP_NAME, paths)}
    scorer = ViClipConsistency(*paths, device=device)
    value, per_video = scorer.score([(j.mp4.name, j.mp4, j.entry.prompt) for j in complete])
    message = "VBench overall_consistency (ViCLIP), computed by VBench's code"
    return {VTC_VICLIP_NAME: _per_video_result(VTC_VICLIP_NAME, value, per_video, message, scorer.protocol())}


def _dover_results(
    paths: tuple[Path, Path] | str,
    settings: DoverSettings,
    complete: Sequence[VideoJob],
    device: torch.device,
) -> dict[str, MetricResult]:
    """``vqa_dover`` (fused), ``vqa_dover_technical`` and ``vqa_dover_aesthetic``, or each skipped."""
    names = {
        "overall": VQA_DOVER_NAME,
        "technical": VQA_DOVER_TECHNICAL_NAME,
        "aesthetic": VQA_DOVER_AESTHETIC_NAME,
    }
    if isinstance(paths, str):
        return {name: skipped(name, paths) for name in names.values()}
    scorer = DoverQuality(*paths, config=settings.config, seed=settings.seed, device=device)
    scores, failed = scorer.score([(j.mp4.name, j.mp4, [j.entry.index, j.seed]) for j in complete])
    protocol = {**scorer.protocol(), "videos_failed": failed}
    if not scores:
        return {name: skipped(name, "DOVER could not read any video", **protocol) for name in names.values()}
    results = {}
    for part, name in names.items():
        per_video = {video: s[part] for video, s in scores.items()}
        message = f"DOVER {part} score x 100, computed by DOVER's code" + (
            f"; {len(failed)} video(s) DOVER could not read" if failed else ""
        )
        value = float(np.mean(list(per_video.values())))
        results[name] = _per_video_result(name, value, per_video, message, protocol)
    return results


def _per_video_result(
    name: str, value: float, per_video: dict[str, float], message: str, protocol: dict[str, Any]
) -> MetricResult:
    """A computed no-reference metric: its mean ``value`` over the videos of ``per_video``."""
    logger.info("%s = %.4f over %d videos", name, value, len(per_video))
    return MetricResult(
        name=name, value=value, status="ok", message=message, num_generated=len(per_video),
        protocol=protocol, per_video=per_video,
    )  # fmt: skip


def run_scoring(
    entries: Sequence[PromptEntry],
    *,
    out_dir: str | os.PathLike,
    seeds: Sequence[int],
    settings: ScoreSettings,
    data_root: str | os.PathLike | None = None,
    benchmark: str = "",
    wandb_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Score the run in ``out_dir`` and write ``results.json`` and ``results.md`` there.

    Args:
        entries: The benchmark's prompts (all of them).
        out_dir: The generation stage's folder.
        seeds: The seeds videos were generated with.
        settings: Which metrics, with which weights.
        data_root: Folder the prompts' ``data_file`` paths are relative to (None: no references).
        benchmark: Benchmark name for the outputs.
        wandb_config: ``{"enabled", "project", "mode", "name"}``; None or disabled logs nothing.

    Returns:
        The content of ``results.json``.

    Raises:
        RuntimeError: If videos are missing and ``settings.require_complete``, or none is complete.
        FileNotFoundError: For a missing reference video or data root.
    """
    out = Path(out_dir)
    jobs = video_jobs(entries, seeds, out)
    done = [is_complete(j) for j in jobs]
    complete: list[VideoJob] = [j for j, ok in zip(jobs, done, strict=True) if ok]
    missing = [j.name for j, ok in zip(jobs, done, strict=True) if not ok]
    if missing and settings.require_complete:
        raise RuntimeError(
            f"{len(missing)} of {len(jobs)} videos in {out} are missing or incomplete (first: {missing[0]}); "
            "finish the generation stage or set score.require_complete=false"
        )
    if not complete:
        raise RuntimeError(f"no complete videos in {out}; run the generation stage first")
    if missing:
        logger.warning(
            "scoring %d of %d videos; %d missing (first: %s)",
            len(complete),
            len(jobs),
            len(missing),
            missing[0],
        )
    refs = _reference_videos(entries, data_root)
    device = resolve_device(settings.device)
    # Upstream checkouts are checked (a wrong one fails here) before any model is loaded.
    viclip_paths, dover_paths = settings.viclip.resolve(), settings.dover.resolve()

    results: dict[str, MetricResult] = {}
    fvd_runs = _fvd_runs(settings.fvd, refs, device, results)
    clip = _clip_scorer(settings, device, results)

    fvd = settings.fvd
    clip_scores: dict[str, float] = {}
    if fvd_runs or clip is not None:
        generated = [_generated_video(j) for j in complete]
        slow = [v.path.name for v in (*generated, *refs) if fvd_runs and v.fps < fvd.fps]
        if slow:
            logger.warning(
                "fvd: %d video(s) below metrics.fvd_i3d.fps=%g repeat frames in their clips (first: %s)",
                len(slow), fvd.fps, slow[0],
            )  # fmt: skip
        for real, videos in ((False, generated), (True, refs if fvd_runs else [])):
            for video in videos:
                count = frame_count(video.path)
                fvd_idx = clip_indices(
                    count, fvd.num_frames, source_fps=video.fps, fps=fvd.fps, start=fvd.start
                )
                clip_idx = clip.frame_indices(count) if (clip is not None and not real) else []
                # Decode each frame once, for every metric that needs it.
                fvd_frames = fvd_idx if (fvd_runs and fvd_idx is not None) else []
                wanted = sorted(set(clip_idx) | set(fvd_frames))
                frames = dict(zip(wanted, read_frames(video.path, wanted), strict=True)) if wanted else {}
                if fvd_runs:
                    clip_frames = None if fvd_idx is None else np.stack([frames[i] for i in fvd_idx])
                    _feed_fvd(fvd_runs, clip_frames, video, real)
                if clip is not None and clip_idx:
                    clip_scores[video.path.name] = clip.score(
                        np.stack([frames[i] for i in clip_idx]), video.prompt
                    )
    for run in fvd_runs:
        results[run.name] = _fvd_result(run)
    if clip is not None:
        results[VTC_CLIP_NAME] = _per_video_result(
            VTC_CLIP_NAME, float(clip.mean.compute()), clip_scores, "CLIP cosine similarity, not the paper's VTC",
            clip.protocol(),
        )  # fmt: skip
    results.update(_viclip_results(viclip_paths, complete, device))
    results.update(_dover_results(dover_paths, settings.dover, complete, device))

    report = {
        "benchmark": benchmark,
        "run_dir": str(out),
        "note": NOT_THE_PAPER,
        "videos": {"expected": len(jobs), "complete": len(complete), "missing": missing},
        "reference": {"data_root": None if data_root is None else str(data_root), "videos": len(refs)},
        "device": str(device),
        "created_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "metrics": {name: results[name].as_dict() for name in METRIC_NAMES},
    }
    write_json_atomic(out / "results.json", report)
    write_text_atomic(out / "results.md", results_markdown(report))
    logger.info("wrote %s and %s", out / "results.json", out / "results.md")
    if wandb_config and wandb_config.get("enabled"):
        _log_wandb(report, wandb_config, out)
    return report


def _format(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def results_markdown(report: dict[str, Any]) -> str:
    """The metrics of ``report`` as a Markdown table, with the note that they are not the paper's."""
    lines = [
        f"# Evaluation: {report['benchmark']}",
        "",
        f"Run: `{report['run_dir']}`; {report['videos']['complete']} of {report['videos']['expected']} videos; "
        f"{report['reference']['videos']} reference videos.",
        "",
        f"{report['note']}",
        "",
        "| metric | value | generated | reference | notes |",
        "|---|---|---|---|---|",
    ]
    for name, m in report["metrics"].items():
        notes = m["message"].replace("|", "/")
        lines.append(
            f"| `{name}` | {_format(m['value'])} | {m['num_generated']} | {m['num_reference']} | {notes} |"
        )
    return "\n".join(lines) + "\n"


def _log_wandb(report: dict[str, Any], config: dict[str, Any], out: Path) -> None:
    import wandb

    run = wandb.init(
        project=config.get("project", "t3-eval"),
        name=config.get("name") or f"eval-{report['benchmark']}",
        mode=config.get("mode"),
        dir=str(out),
        job_type="eval",
        config={"benchmark": report["benchmark"], "run_dir": report["run_dir"], "note": report["note"]},
    )
    columns = ["metric", "value", "status", "num_generated", "num_reference", "message"]
    table = wandb.Table(columns=columns)
    scalars = {}
    for name, m in report["metrics"].items():
        table.add_data(name, m["value"], m["status"], m["num_generated"], m["num_reference"], m["message"])
        if m["value"] is not None:
            scalars[f"eval/{name}"] = m["value"]
    run.log({"eval/results": table, **scalars})
    run.finish()

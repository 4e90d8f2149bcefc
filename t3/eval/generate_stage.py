"""The generation stage: one video per prompt and seed, sharded, resumable and safe to kill.

Files in ``out_dir`` for prompt ``i`` and seed ``s`` (names from `t3.generate.video_file_name`):

* ``video_{i:05d}_seed{s}.mp4``: written by `t3.video_io.write_video` under a temporary name
  (``.video_....mp4.<random>.part``) and renamed when complete;
* ``video_{i:05d}_seed{s}.json``: the record (prompt, seed, size, steps, schedule, checkpoint sha256,
  timings), written atomically *after* the mp4.

A video counts as done only when both files exist and the record's frame count equals the mp4's
(`t3.video_io.video_info`). So a task killed at any moment leaves either a finished pair, an mp4 without
a record (regenerated), or a temporary file (deleted on restart, only for this shard's videos, since other
shards may be writing theirs). A record made with other settings (steps, size, checkpoint...) stops the
run with an error naming the file and the key, instead of mixing two runs in one folder.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from t3.attention import Schedule
from t3.config import check_field_types
from t3.diffusion import SCHEDULER_NAMES
from t3.eval.prompts import PromptEntry, shard_range
from t3.generate import (
    WAN_NEGATIVE_PROMPT,
    T2VGenerator,
    cfg_batch,
    generate,
    video_file_name,
)
from t3.io import sha256_file, write_json_atomic, write_text_atomic
from t3.memory import check_inference_memory
from t3.models import get_spec, load_dit, load_text_encoder, load_vae
from t3.models.build import DTYPES
from t3.profiling import device_name
from t3.video_io import VideoIOError, video_info, write_video

__all__ = [
    "GenerationSettings",
    "GenerationSummary",
    "ModelPaths",
    "VideoJob",
    "check_memory",
    "check_settings",
    "checkpoint_sha256",
    "completed_record",
    "is_complete",
    "resolve_device",
    "resolve_dtype",
    "run_generation",
    "shard_jobs",
    "video_jobs",
    "write_json_atomic",
    "write_text_atomic",
]

logger = logging.getLogger(__name__)

#: Record keys that must agree between a finished video and the current run for it to be kept.
RECORD_KEYS = (
    "prompt",
    "seed",
    "height",
    "width",
    "frames",
    "steps",
    "guidance_scale",
    "flow_shift",
    "sampler",
    "negative_prompt",
    "model",
    "schedule",
    "schedule_rules",
    "checkpoint_sha256",
)

# --- settings ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationSettings:
    """How every video of a run is generated (the ``generation`` config node).

    Attributes:
        height: Frame height in pixels (the authors' 4K: 2176).
        width: Frame width in pixels (3840).
        frames: Frames per video, ``4k + 1`` (81).
        steps: Sampler steps (50).
        guidance_scale: Classifier-free guidance scale (5.0).
        flow_shift: Timestep shift of the sampler (5.0).
        seeds: One video per prompt and seed; each video's noise comes from its seed alone.
        negative_prompt: Negative prompt; None = Wan's standard one (`t3.generate.WAN_NEGATIVE_PROMPT`).
        fps: Frame rate written into the mp4s (the authors saved at 30).
        sampler: ``diffsynth_euler`` (the T3 authors' sampler), ``unipc`` (the official Wan sampler) or
            ``euler`` (diffusers' flow-matching Euler); see `t3.diffusion.build_scheduler`.
        dtype: DiT compute dtype: ``auto`` (bfloat16 on CUDA, float32 on CPU), ``bfloat16``, ``float32``...
        device: ``auto`` (CUDA if available), ``cuda``, ``cpu``...
        backend: T3 attention backend (``auto``, ``sdpa``, ``flash``).
        tokens_per_call: bound on the gathered slots per T3 attention call (from
            ``model.attention_tokens_per_call``); None: automatic.
        vae_tiling: Decode in spatial tiles (needed at 4K).
    """

    height: int = 2176
    width: int = 3840
    frames: int = 81
    steps: int = 50
    guidance_scale: float = 5.0
    flow_shift: float = 5.0
    seeds: tuple[int, ...] = (0,)
    negative_prompt: str | None = None
    fps: float = 30.0
    sampler: str = "diffsynth_euler"
    dtype: str = "auto"
    device: str = "auto"
    backend: str = "auto"
    tokens_per_call: int | None = None
    vae_tiling: bool = True

    def __post_init__(self) -> None:
        # Types first (a value of the wrong type would otherwise fail inside a model, naming no key).
        check_field_types(
            self,
            "generation",
            {"backend": "model.attention_backend", "tokens_per_call": "model.attention_tokens_per_call"},
        )
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        if self.tokens_per_call is not None and (
            isinstance(self.tokens_per_call, bool)
            or not isinstance(self.tokens_per_call, int)
            or self.tokens_per_call < 1
        ):
            raise ValueError(
                f"model.attention_tokens_per_call must be a positive integer or null, got {self.tokens_per_call!r}"
            )
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(
                f"generation.seeds must be a non-empty list of distinct ints, got {list(self.seeds)}"
            )
        if self.steps < 1:
            raise ValueError(f"generation.steps must be >= 1, got {self.steps}")
        if not self.fps > 0:
            raise ValueError(f"generation.fps must be > 0, got {self.fps}")
        if self.sampler not in SCHEDULER_NAMES:
            raise ValueError(
                f"generation.sampler must be one of {list(SCHEDULER_NAMES)}, got {self.sampler!r}"
            )
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(
                f"generation.dtype must be 'auto' or one of {sorted(DTYPES)}, got {self.dtype!r}"
            )

    @property
    def negative(self) -> str:
        return WAN_NEGATIVE_PROMPT if self.negative_prompt is None else self.negative_prompt


@dataclass(frozen=True)
class ModelPaths:
    """Where the parts of the model are (the ``model`` config node plus ``ckpt``).

    For the ``tiny`` preset a null path means the tiny random part (`t3.models.tiny`), built in memory
    from ``seed``: a CPU end-to-end run with nothing on disk. Every other preset needs all three paths.

    Attributes:
        preset: Model preset (`t3.models.preset_names`).
        dit_path: DiT checkpoint in any format `t3.models.load_dit` reads (``ckpt`` overrides the model's).
        vae_path: Wan VAE folder.
        text_encoder_path: umT5 folder.
        seed: Seed of the tiny random parts (``model.seed``).
    """

    preset: str
    dit_path: str | None
    vae_path: str | None
    text_encoder_path: str | None
    seed: int = 0

    @property
    def random_parts(self) -> bool:
        """Whether null paths stand for the tiny random parts."""
        return self.preset == "tiny"

    def check(self) -> None:
        """One-line error naming the key of the first missing path."""
        for key, value in (
            ("ckpt / model.dit_path", self.dit_path),
            ("model.vae_path", self.vae_path),
            ("model.text_encoder_path", self.text_encoder_path),
        ):
            if value is None:
                if self.random_parts:
                    continue
                raise ValueError(
                    f"{key} is required for generation (a local path), got null; only model=tiny builds "
                    "random parts in memory"
                )
            if not Path(value).exists():
                raise FileNotFoundError(f"{key}={value!r}: no such file or folder")

    @property
    def dit_source(self) -> str:
        """The DiT's path, or what stands in for it."""
        return str(self.dit_path) if self.dit_path is not None else f"tiny random DiT (seed {self.seed})"

    def load_dit(self, dtype: torch.dtype) -> torch.nn.Module:
        """The DiT in ``dtype`` on the CPU (the tiny random one for a null path)."""
        if self.dit_path is None:
            from t3.models.tiny import tiny_dit

            return tiny_dit(self.seed)
        return load_dit(self.dit_path, preset=self.preset, dtype=dtype, transform=False)

    def load_vae(self) -> torch.nn.Module:
        """The VAE in float32 on the CPU (the tiny random one for a null path)."""
        if self.vae_path is None:
            from t3.models.tiny import tiny_vae

            return tiny_vae(self.seed)
        return load_vae(self.vae_path, dtype=torch.float32)

    def load_text_encoder(self, dtype: torch.dtype) -> Any:
        """The text encoder in ``dtype`` on the CPU (the tiny random one for a null path)."""
        if self.text_encoder_path is None:
            from t3.models.tiny import tiny_text_encoder

            return tiny_text_encoder(self.seed).to(dtype=dtype)
        return load_text_encoder(self.text_encoder_path, dtype=dtype)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


# --- jobs and their files ---------------------------------------------------------------------------------


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


def _remove_partials(job: VideoJob) -> None:
    """Delete temporary files a killed writer left for this job (``write_video``'s and ours)."""
    for pattern in (f".{job.mp4.name}.*.part", f".{job.record.name}.*.tmp"):
        for leftover in job.mp4.parent.glob(pattern):
            logger.info("removing partial file %s", leftover)
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()


def _check_record_matches(job: VideoJob, record: dict[str, Any], expected: dict[str, Any]) -> None:
    for key in RECORD_KEYS:
        if record.get(key) != expected[key]:
            raise ValueError(
                f"{job.record}: {key} is {record.get(key)!r} but this run has {expected[key]!r}; "
                "generate into another out_dir, or delete the old videos"
            )


# --- checkpoint hash --------------------------------------------------------------------------------------

_SHARD_RE = re.compile(r"^(?P<stem>.+)-\d+-of-(?P<total>\d+)\.safetensors$")


def _checkpoint_files(path: Path) -> list[Path]:
    """The files that make up a DiT checkpoint as `t3.models.load_dit` reads it."""
    if path.is_file():
        match = _SHARD_RE.match(path.name)
        if match:  # one shard named: the whole set is the checkpoint
            return sorted(path.parent.glob(f"{match['stem']}-*-of-{match['total']}.safetensors"))
        return [path]
    if (path / "transformer").is_dir() and not (path / "config.json").is_file():
        path = path / "transformer"  # a pipeline folder: load_dit reads its transformer/
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".safetensors", ".json"))
    if not files:
        raise FileNotFoundError(f"checkpoint {path} holds no .safetensors or .json files")
    return files


def checkpoint_sha256(path: str | os.PathLike, cache_file: str | os.PathLike | None = None) -> str:
    """sha256 of a DiT checkpoint; for several files, of their ``sha256sum``-style listing.

    A single file's value is its own sha256 (what ``sha256sum`` prints). For a folder or a shard set, it
    is the sha256 of the lines ``"<sha256>  <file name>\\n"`` sorted by name. Per-file hashes are cached
    in ``cache_file`` (JSON) keyed by absolute path, size and mtime, so the shards of an array job and
    restarts hash a multi-GB checkpoint once.
    """
    files = _checkpoint_files(Path(path))
    cache: dict[str, str] = {}
    if cache_file is not None:
        with contextlib.suppress(OSError, json.JSONDecodeError):
            cache = json.loads(Path(cache_file).read_text())
    hashes, changed = {}, False
    for file in files:
        stat = file.stat()
        key = f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        if key not in cache:
            logger.info("hashing %s (%.1f MB)", file, stat.st_size / 1e6)
            cache[key], changed = sha256_file(file), True
        hashes[file.name] = cache[key]
    if changed and cache_file is not None:
        # Shards may write this at once; each writes a complete file, so the worst case is a lost entry.
        write_json_atomic(cache_file, cache)
    if len(files) == 1 and Path(path).is_file():
        return hashes[files[0].name]
    listing = "".join(f"{hashes[name]}  {name}\n" for name in sorted(hashes))
    return hashlib.sha256(listing.encode()).hexdigest()


# --- the stage --------------------------------------------------------------------------------------------


@dataclass
class GenerationSummary:
    """What one shard did."""

    shard_index: int
    num_shards: int
    num_jobs: int
    skipped: list[str] = field(default_factory=list)  # already complete
    generated: list[str] = field(default_factory=list)


def _expected_record(
    job: VideoJob, settings: GenerationSettings, model: ModelPaths, schedule: Schedule, ckpt_sha: str
) -> dict[str, Any]:
    return {
        "prompt": job.entry.prompt,
        "seed": job.seed,
        "height": settings.height,
        "width": settings.width,
        "frames": settings.frames,
        "steps": settings.steps,
        "guidance_scale": settings.guidance_scale,
        "flow_shift": settings.flow_shift,
        "sampler": settings.sampler,
        "negative_prompt": settings.negative,
        "model": model.preset,
        "schedule": schedule.name,
        # The rules too: a custom schedule may reuse a preset's name.
        "schedule_rules": "; ".join(map(str, schedule.rules))
        + f"; share_identical_branches={schedule.share_identical_branches}",
        "checkpoint_sha256": ckpt_sha,
    }


def check_settings(settings: GenerationSettings, model: ModelPaths, schedule: Schedule) -> None:
    """Size and schedule checks from the config alone (no weights), with one-line errors."""
    spec = get_spec(model.preset)
    grid = spec.video_token_grid(settings.frames, settings.height, settings.width)  # legal, within RoPE
    schedule.plans(grid, int(spec.dit_config["num_layers"]))


def check_memory(settings: GenerationSettings, model: ModelPaths) -> None:
    """Refuse, before loading anything, a video whose DiT step cannot fit on the device (one line)."""
    device = resolve_device(settings.device)
    check_inference_memory(
        get_spec(model.preset), (settings.height, settings.width, settings.frames),
        batch=cfg_batch(settings.guidance_scale), dtype=resolve_dtype(settings.dtype, device), device=device,
        what="generation", size_keys=("generation.height", "generation.width"),
    )  # fmt: skip


def run_generation(
    entries: Sequence[PromptEntry],
    *,
    out_dir: str | os.PathLike,
    settings: GenerationSettings,
    model: ModelPaths,
    schedule: Schedule,
    shard_index: int = 0,
    num_shards: int = 1,
    hash_cache: str | os.PathLike | None = None,
) -> GenerationSummary:
    """Generate this shard's missing videos into ``out_dir``.

    Everything that can fail from the config alone (size, schedule, paths, records of another run) fails
    before a model is loaded; the models are not loaded at all when the shard is already complete.

    Args:
        entries: The whole benchmark (all shards), as from `t3.eval.prompts.load_prompts`.
        out_dir: Folder of the videos and records (shared by all shards).
        settings: Size, sampler and seeds.
        model: Model preset and paths.
        schedule: The T3 schedule the DiT is transformed with (``dense`` for the baseline).
        shard_index: This shard.
        num_shards: Number of shards.
        hash_cache: JSON file caching checkpoint hashes.

    Returns:
        A `GenerationSummary`.
    """
    check_settings(settings, model, schedule)
    model.check()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = shard_jobs(entries, settings.seeds, out, shard_index, num_shards)
    summary = GenerationSummary(shard_index, num_shards, len(jobs))
    # The tiny random DiT is identified by its seed: the same seed builds the same weights.
    ckpt_sha = (
        checkpoint_sha256(model.dit_path, hash_cache) if model.dit_path is not None else model.dit_source
    )

    todo = []
    for job in jobs:
        _remove_partials(job)
        expected = _expected_record(job, settings, model, schedule, ckpt_sha)
        record = completed_record(job)
        if record is not None:
            _check_record_matches(job, record, expected)
            summary.skipped.append(job.name)
        else:
            todo.append((job, expected))
    logger.info(
        "shard %d/%d: %d videos, %d complete, %d to generate in %s",
        shard_index, num_shards, len(jobs), len(summary.skipped), len(todo), out,
    )  # fmt: skip
    if not todo:
        return summary

    check_memory(settings, model)
    generator = _load_generator(settings, model, schedule)
    device = generator.device
    for job, expected in todo:
        result = generate(
            [job.entry.prompt],
            generator=generator,
            height=settings.height,
            width=settings.width,
            frames=settings.frames,
            steps=settings.steps,
            guidance_scale=settings.guidance_scale,
            negative_prompt=settings.negative,
            seed=job.seed,
            fps=settings.fps,
            progress=False,
        )[0]
        assert result.frames is not None
        created = datetime.datetime.now(datetime.UTC)
        start = time.perf_counter()
        write_video(job.mp4, result.frames, settings.fps)
        result.timings.write = time.perf_counter() - start
        record = {
            **expected,
            "index": job.entry.index,
            "data_file": job.entry.data_file,
            "video": job.mp4.name,
            "fps": settings.fps,  # the rate the mp4 is labelled with (the authors': 30)
            "content_fps": get_spec(model.preset).frame_rate,  # the rate of the motion: what FVD samples at
            "checkpoint": model.dit_source,
            "schedule_description": schedule.description,
            "dtype": str(generator.dtype).removeprefix("torch."),
            "device": device_name(device),
            "attention_backend": settings.backend,
            "timings_s": {**asdict(result.timings), "total": result.timings.total},
            "created_utc": created.isoformat(timespec="seconds"),
        }
        # After the mp4: a record always describes a complete video.
        write_json_atomic(job.record, record)
        summary.generated.append(job.name)
        logger.info(
            "shard %d/%d: %s done (%d/%d) in %.1fs",
            shard_index, num_shards, job.name, len(summary.generated), len(todo), result.timings.total,
        )  # fmt: skip
    return summary


def _load_generator(settings: GenerationSettings, model: ModelPaths, schedule: Schedule) -> T2VGenerator:
    """Load the DiT (in the compute dtype), the VAE (float32) and the text encoder onto the device."""
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    return T2VGenerator(
        model.load_dit(dtype),
        model.load_vae(),
        model.load_text_encoder(dtype).to(device),
        spec=model.preset,
        schedule=schedule,
        backend=settings.backend,
        tokens_per_call=settings.tokens_per_call,
        scheduler=settings.sampler,
        flow_shift=settings.flow_shift,
        dtype=dtype,
        device=device,
        vae_tiling=settings.vae_tiling,
        # The schedule was chosen against the checkpoint's T3 record by the caller (eval.py:
        # t3.eval.run.eval_schedule, which refuses a conflict unless allow_schedule_change=true).
        allow_schedule_change=True,
    )

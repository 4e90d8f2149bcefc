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

Under ``torchrun`` (``parallel.sequence_parallel_size`` = ``sp``, see `t3.parallel`): the ``world / sp``
SP groups of consecutive ranks split the shard's missing videos (group ``k`` takes the ``k``-th of every
``world / sp``, from one list that global rank 0 makes and broadcasts, so every rank sees the same split);
the ranks of a group make one video at a time together, with the same seed and noise. Rank 0 of each
group alone builds the text encoder and the VAE, decodes and writes the video and its record; the others
hold only the DiT and wait at a group barrier meanwhile. Each record names the ``sequence_parallel_size``
it was made with (not a setting that must agree for a rerun to keep a video: SP gives the same latents).
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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch.distributed as dist

from t3.attention import Schedule
from t3.config import ParallelConfig
from t3.eval.jobs import VideoJob, completed_record, shard_jobs
from t3.eval.prompts import PromptEntry
from t3.eval.settings import (
    GenerationSettings,
    ModelPaths,
    check_parallel,
    check_settings,
    resolve_device,
    resolve_dtype,
)
from t3.generate import (
    T2VGenerator,
    cfg_batch,
    generate,
)
from t3.io import sha256_file, write_json_atomic
from t3.memory import check_inference_memory
from t3.models import get_spec
from t3.parallel import ParallelGroups, build_parallel_groups
from t3.parallel.torchrun import distributed_from_env, env_world_size
from t3.profiling import device_name
from t3.video_io import write_video

__all__ = [
    "GenerationSummary",
    "check_memory",
    "checkpoint_sha256",
    "run_generation",
]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

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

# --- partial files and records of another run ----------------------------------------------------------


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
    """What one shard did (under ``torchrun``: what this rank's SP group did).

    Attributes:
        shard_index, num_shards: The shard.
        num_jobs: Videos of the shard.
        skipped: Those already complete.
        generated: Those this process's SP group made (alone: this process).
        writer: Whether this process wrote them (rank 0 of its SP group, or alone).
    """

    shard_index: int
    num_shards: int
    num_jobs: int
    skipped: list[str] = field(default_factory=list)
    generated: list[str] = field(default_factory=list)
    writer: bool = True


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


def check_memory(settings: GenerationSettings, model: ModelPaths, sequence_parallel: int = 1) -> None:
    """Refuse, before loading anything, a video whose DiT step cannot fit on the device (one line); under
    sequence parallelism each device holds its share of the tokens."""
    device = resolve_device(settings.device)
    check_inference_memory(
        get_spec(model.preset), (settings.height, settings.width, settings.frames),
        batch=cfg_batch(settings.guidance_scale), dtype=resolve_dtype(settings.dtype, device), device=device,
        what="generation", size_keys=("generation.height", "generation.width"),
        instead="a larger parallel.sequence_parallel_size (under torchrun)", sequence_parallel=sequence_parallel,
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
    parallel: ParallelConfig | None = None,
) -> GenerationSummary:
    """Generate this shard's missing videos into ``out_dir``.

    Everything that can fail from the config alone (size, schedule, SP size against the world size and
    the token grid, paths, records of another run) fails before a model is loaded; the models are not
    loaded at all when the shard is already complete. Under ``torchrun`` (``WORLD_SIZE > 1``) every rank
    calls this; it joins the launch's process group (`t3.parallel.torchrun`) and splits the work as the
    module docstring says.

    Args:
        entries: The whole benchmark (all shards), as from `t3.eval.prompts.load_prompts`.
        out_dir: Folder of the videos and records (shared by all shards).
        settings: Size, sampler and seeds.
        model: Model preset and paths.
        schedule: The T3 schedule the DiT is transformed with (``dense`` for the baseline).
        shard_index: This shard.
        num_shards: Number of shards.
        hash_cache: JSON file caching checkpoint hashes.
        parallel: Sequence parallelism (the ``parallel`` config node); None: one rank per video.

    Returns:
        A `GenerationSummary`.
    """
    parallel = parallel if parallel is not None else ParallelConfig()
    check_settings(settings, model, schedule)
    check_parallel(parallel, settings, model, env_world_size())
    model.check()
    with distributed_from_env(resolve_device(settings.device)) as distributed:
        groups = build_parallel_groups(parallel.sequence_parallel_size) if distributed else None
        return _generate_shard(
            entries, Path(out_dir), settings, model, schedule, shard_index, num_shards, hash_cache,
            parallel, groups,
        )  # fmt: skip


def _on_rank0(compute: Callable[[], _T]) -> _T:
    """``compute()`` run on global rank 0 alone; its result, or its exception, on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return compute()
    payload: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            payload[0] = (True, compute())
        except Exception as err:  # the other ranks must not wait for a list that never comes
            payload[0] = (False, err)
    dist.broadcast_object_list(payload, src=0)
    ok, value = payload[0]
    if not ok:
        raise value
    return value


def _pending(
    jobs: list[VideoJob],
    settings: GenerationSettings,
    model: ModelPaths,
    schedule: Schedule,
    hash_cache: str | os.PathLike | None,
) -> tuple[list[str], list[tuple[VideoJob, dict[str, Any]]]]:
    """The complete videos' names, and the missing ones with their expected records (leftovers removed)."""
    # The tiny random DiT is identified by its seed: the same seed builds the same weights.
    ckpt_sha = (
        checkpoint_sha256(model.dit_path, hash_cache) if model.dit_path is not None else model.dit_source
    )
    skipped, todo = [], []
    for job in jobs:
        _remove_partials(job)
        expected = _expected_record(job, settings, model, schedule, ckpt_sha)
        record = completed_record(job)
        if record is not None:
            _check_record_matches(job, record, expected)
            skipped.append(job.name)
        else:
            todo.append((job, expected))
    return skipped, todo


def _generate_shard(
    entries: Sequence[PromptEntry],
    out: Path,
    settings: GenerationSettings,
    model: ModelPaths,
    schedule: Schedule,
    shard_index: int,
    num_shards: int,
    hash_cache: str | os.PathLike | None,
    parallel: ParallelConfig,
    groups: ParallelGroups | None,
) -> GenerationSummary:
    out.mkdir(parents=True, exist_ok=True)
    jobs = shard_jobs(entries, settings.seeds, out, shard_index, num_shards)
    # One look at the folder, by one rank: ranks that looked at different moments would split differently.
    skipped, todo = _on_rank0(lambda: _pending(jobs, settings, model, schedule, hash_cache))
    writer = groups is None or groups.sp_rank == 0
    summary = GenerationSummary(shard_index, num_shards, len(jobs), skipped=skipped, writer=writer)
    where = f"shard {shard_index}/{num_shards}"
    if groups is not None:
        todo = todo[groups.dp_rank :: groups.dp_size]
        where += f", SP group {groups.dp_rank}/{groups.dp_size} (rank {groups.sp_rank} of {groups.sp_size})"
    logger.info(
        "%s: %d videos, %d complete, %d to generate in %s",
        where, len(jobs), len(skipped), len(todo), out,
    )  # fmt: skip
    if not todo:
        return summary

    check_memory(settings, model, parallel.sequence_parallel_size)
    generator = _load_generator(settings, model, schedule, parallel, groups)
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
        summary.generated.append(job.name)
        if not writer:
            continue
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
            "sequence_parallel_size": parallel.sequence_parallel_size,
            "timings_s": {**asdict(result.timings), "total": result.timings.total},
            "created_utc": created.isoformat(timespec="seconds"),
        }
        # After the mp4: a record always describes a complete video.
        write_json_atomic(job.record, record)
        logger.info(
            "%s: %s done (%d/%d) in %.1fs",
            where, job.name, len(summary.generated), len(todo), result.timings.total,
        )  # fmt: skip
    return summary


def _load_generator(
    settings: GenerationSettings,
    model: ModelPaths,
    schedule: Schedule,
    parallel: ParallelConfig,
    groups: ParallelGroups | None,
) -> T2VGenerator:
    """Load the DiT (in the compute dtype), the VAE (float32) and the text encoder onto the device; under
    SP the VAE and the text encoder on rank 0 of the group only."""
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    first = groups is None or groups.sp_rank == 0
    return T2VGenerator(
        model.load_dit(dtype),
        model.load_vae() if first else None,
        model.load_text_encoder(dtype).to(device) if first else None,
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
        sp_group=groups.sp_group if groups is not None else None,
        sp_align=parallel.align,
        sp_policy=parallel.policy,
        sp_max_imbalance=parallel.max_imbalance,
    )

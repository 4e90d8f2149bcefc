"""Latent shards from raw videos: the logic of ``data/prepare.py``.

A video list (CSV or JSON lines, `read_video_list`) is decoded clip by clip (`t3.data.video`), encoded with
the VAE and the text encoder, and written as shards in the schema of `t3.data.shards`. The folder is
resumable: each finished shard has a ``.stats.json``; a rerun with the same settings (`SETTINGS_FILE`)
reuses them and redoes the rest, a rerun with other settings is refused (`check_existing_settings`).
Unusable videos are skipped, listed in ``skipped.jsonl`` and counted in ``manifest.json``.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import os
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from t3.data.shards import SCHEMA_VERSION, encode_sample, module_fingerprint
from t3.data.video import Clip, ClipError, read_clip
from t3.io import write_json_atomic, write_jsonl_atomic

if TYPE_CHECKING:
    from t3.models.presets import ModelSpec
    from t3.models.text_encoder import PromptEmbeddingCache

__all__ = [
    "SETTINGS_FILE",
    "PrepareResult",
    "VideoListEntry",
    "check_existing_settings",
    "check_prepare_arguments",
    "prepare_settings",
    "prepare_shards",
    "read_video_list",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VideoListEntry:
    """One row of a video list.

    Attributes:
        index: Position in the list; fixes the processing order, the shard and the sample key.
        source: The path as written in the list (recorded in the sample metadata).
        path: ``source`` resolved against the list file's folder; None if the row has no path.
        caption: The caption, stripped; None if missing or empty.
        where: ``"<list file>:<line>"`` for messages.
        error: Why the row itself is unusable (unparsable line, no path); None if fine.
    """

    index: int
    source: str
    path: Path | None
    caption: str | None
    where: str
    error: str | None = None


def _as_row(item: Any) -> tuple[dict[str, Any] | None, str | None]:
    """A parsed JSON list item as ``(row, error)``."""
    return (item, None) if isinstance(item, dict) else (None, f"not an object: {item!r:.40}")


#: Column names a video list may use: ours, and the T3-Video prompt files' (``data_file``, ``prompt_en``).
LIST_COLUMNS = ("path", "caption", "data_file", "prompt_en")


def _csv_rows(list_file: Path, text: str) -> list[tuple[int, dict[str, Any] | None, str | None]]:
    """The rows of a CSV video list as ``(line, row, error)``, checked field by field.

    ``csv.DictReader`` would silently mis-read broken lines: an unquoted comma cuts the caption (the rest
    goes to an unnamed column), and an unclosed quote swallows every following row into one caption. Here
    a row whose field count differs from the header's, or whose caption spans lines, is kept with an
    ``error`` (skipped later as ``bad_entry``); a quote that runs to the end of the file is fatal, naming
    the line where it opened.
    """
    # strict: a quote that is never closed raises at the end of the data instead of ending the field.
    reader = csv.reader(io.StringIO(text), strict=True)
    rows: list[tuple[int, dict[str, Any] | None, str | None]] = []
    header: list[str] | None = None
    while True:
        first_line = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            if "end of data" in str(err):  # only raised at the end of the file, inside a quoted field
                raise ValueError(
                    f"{list_file}:{first_line}: a quote opened on this line is never closed (it runs to the "
                    "end of the file); close it, or quote the whole caption"
                ) from None
            rows.append((first_line, None, f"unparsable CSV row ({err})"))
            continue
        if not fields:  # a blank line
            continue
        if header is None:
            header = [name.strip() for name in fields]
            if "path" not in header and "data_file" not in header:
                raise ValueError(f"{list_file}: CSV needs a header with columns path,caption; got {header}")
            ignored = [name for name in header if name not in LIST_COLUMNS]
            if ignored:
                logger.warning("%s: columns %s are ignored (only path,caption are read)", list_file, ignored)
            continue
        row = dict(zip(header, fields, strict=False))  # for the path in messages, even of a bad row
        error = None
        if reader.line_num > first_line:
            error = f"a line break inside a field (lines {first_line}-{reader.line_num}; an unclosed quote?)"
        elif len(fields) != len(header):
            error = (
                f"{len(fields)} field{'s' * (len(fields) != 1)} but the header has {len(header)} columns "
                "(quote captions that contain commas)"
            )
        rows.append((first_line, row, error))
    if header is None:
        raise ValueError(f"{list_file}: CSV needs a header with columns path,caption; the file is empty")
    return rows


def read_video_list(list_file: str | os.PathLike) -> list[VideoListEntry]:
    """Parse a video list: CSV with columns ``path,caption``, JSON lines, or a JSON array.

    JSON objects use ``path`` and ``caption`` (the T3-Video prompt files' ``data_file`` and ``prompt_en`` are
    accepted too). Relative paths are relative to the list file's folder. Rows that cannot be used (an
    unparsable line, a CSV row with the wrong number of fields, a caption holding a line break, no path) are
    kept as entries with an ``error`` so the caller can report them in order instead of failing.

    Raises:
        FileNotFoundError: If the list file does not exist.
        ValueError: If a CSV has no ``path`` column or a quote that runs to the end of the file, a JSON file
            is not a list, or the list is empty.
    """
    list_file = Path(list_file)
    if not list_file.is_file():
        raise FileNotFoundError(f"video list not found: {list_file}")
    root = list_file.parent
    rows: list[tuple[int, dict[str, Any] | None, str | None]] = []  # (line, row, parse error)
    text = list_file.read_text(encoding="utf-8-sig")  # utf-8-sig: spreadsheets like to add a BOM
    suffix = list_file.suffix.lower()
    if suffix == ".csv":
        rows = _csv_rows(list_file, text)
    elif suffix == ".json":
        items = json.loads(text)
        if not isinstance(items, list):
            raise ValueError(f"{list_file}: expected a JSON array of objects, got {type(items).__name__}")
        rows = [(i + 1, *_as_row(item)) for i, item in enumerate(items)]
    else:  # JSON lines (.jsonl or anything else)
        for line_num, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError as err:
                rows.append((line_num, None, f"invalid JSON ({err})"))
                continue
            rows.append((line_num, *_as_row(item)))
    if not rows:
        raise ValueError(f"{list_file}: no entries")

    entries = []
    for index, (line_num, row, error) in enumerate(rows):
        where = f"{list_file.name}:{line_num}"
        row = row or {}
        source = str(row.get("path") or row.get("data_file") or "").strip()
        caption = row.get("caption", row.get("prompt_en"))
        if error is None and isinstance(caption, str) and ("\n" in caption or "\r" in caption):
            error = "the caption holds a line break"
        caption = caption.strip() if isinstance(caption, str) and caption.strip() else None
        if error is None and not source:
            error = "no path"
        path = (root / source) if source else None
        entries.append(VideoListEntry(index, source, path, caption, where, error))
    return entries


@dataclass
class PrepareResult:
    """What :func:`prepare_shards` did.

    Attributes:
        shards: All shard files of the data set, in order.
        samples: Samples in the data set.
        skipped: One record per skipped input (``index``, ``path``, ``reason``, ``detail``, ``where``).
        reused: Shards found complete and not rebuilt.
        manifest: The manifest written to ``manifest.json``.
    """

    shards: list[Path]
    samples: int
    skipped: list[dict[str, Any]]
    reused: int
    manifest: dict[str, Any]


#: The settings file of a shard folder: written with its first finished shard, compared on every rerun.
SETTINGS_FILE = "prepare_config.json"


def check_prepare_arguments(
    spec: ModelSpec,
    *,
    height: int,
    width: int,
    frames: int,
    fps: float | None,
    start: float = 0.0,
    max_upscale: float = 1.0,
    samples_per_shard: int = 64,
    tile_size: int | None = None,
    tile_stride: int | None = None,
    decode_workers: int = 2,
    name: Callable[[str], str] = str,
) -> tuple[int, int, int, int]:
    """Check the settings of :func:`prepare_shards` from their values alone, before any model is loaded.

    Args:
        spec: Model preset the shards are for.
        name: Spells an argument name in messages (``data/prepare.py`` gives ``--max-upscale``).
        Others: As in :func:`prepare_shards`.

    Returns:
        The latent shape ``[C, T', H', W']`` of one clip.

    Raises:
        ValueError: One line naming the first bad argument, its value and what is accepted.
    """

    def fail(key: str, value: Any, accepted: str) -> ValueError:
        return ValueError(f"{name(key)}={value}: {accepted}")

    for key, value in (("height", height), ("width", width), ("frames", frames)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise fail(key, value, "must be a positive integer")
    try:
        latent_shape = spec.latent_shape(frames, height, width)
        spec.token_grid(latent_shape)
    except ValueError as err:
        size = f"{name('height')}={height} {name('width')}={width} {name('frames')}={frames}"
        raise ValueError(f"{size}: {err}") from None
    if fps is not None and not fps > 0:
        raise fail("fps", fps, "must be > 0 (or unset/0: the source's own rate)")
    if not start >= 0:
        raise fail("start", start, "must be >= 0 seconds")
    if not max_upscale >= 1:
        raise fail("max_upscale", max_upscale, "must be >= 1 (1: never upscale; smaller videos are skipped)")
    if samples_per_shard < 1:
        raise fail("samples_per_shard", samples_per_shard, "must be >= 1")
    for key, value in (("tile_size", tile_size), ("tile_stride", tile_stride)):
        if value is not None and value < 1:
            raise fail(key, value, "must be a positive number of pixels")
    if tile_size is not None and tile_stride is not None and tile_stride > tile_size:
        raise fail(
            "tile_stride",
            tile_stride,
            f"must be <= {name('tile_size')}={tile_size} (tiles must overlap or touch)",
        )
    if decode_workers < 0:
        raise fail("decode_workers", decode_workers, "must be >= 0 (0 decodes in the main thread)")
    return latent_shape


def prepare_settings(
    entries: Sequence[VideoListEntry],
    *,
    spec: ModelSpec,
    height: int,
    width: int,
    frames: int,
    fps: float | None,
    start: float = 0.0,
    max_upscale: float = 1.0,
    samples_per_shard: int = 64,
    latent_dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """The settings that fix the content of a shard folder, except the models' identities (which need them
    loaded): a rerun into the folder must match them (:func:`check_existing_settings`)."""
    listing = hashlib.sha256(json.dumps([[e.source, e.caption] for e in entries]).encode()).hexdigest()[:16]
    return {
        "schema_version": SCHEMA_VERSION,
        "inputs": listing,
        "num_inputs": len(entries),
        "preset": spec.name,
        "height": height,
        "width": width,
        "frames": frames,
        "fps": fps,
        "start": start,
        "max_upscale": max_upscale,
        "samples_per_shard": samples_per_shard,
        "latent_dtype": str(latent_dtype).removeprefix("torch."),
    }


def check_existing_settings(out_dir: str | os.PathLike, settings: dict[str, Any]) -> None:
    """Refuse to mix shards made with different settings in one folder (resuming would silently do so).

    Compares the keys of ``settings`` with the folder's ``prepare_config.json``, if it has one (the file is
    written with the first finished shard, so a folder without shards accepts any settings).

    Raises:
        ValueError: Naming the first setting that differs.
    """
    file = Path(out_dir) / SETTINGS_FILE
    if not file.is_file():
        return
    old = json.loads(file.read_text())
    for key, value in settings.items():
        if old.get(key) != value:
            raise ValueError(
                f"{file}: existing shards were made with {key}={old.get(key)!r}, now {value!r}; "
                "use another --out folder or delete this one"
            )


def _decoded_clips(
    entries: Sequence[VideoListEntry], workers: int, **clip_kwargs: Any
) -> Iterator[tuple[VideoListEntry, Clip | None, ClipError | None]]:
    """Decode clips in order, ``workers`` ahead in background threads (decord and FFmpeg release the GIL)."""

    def decode(entry: VideoListEntry) -> tuple[Clip | None, ClipError | None]:
        try:
            return read_clip(entry.path, **clip_kwargs), None
        except ClipError as err:
            return None, err

    if workers < 1:
        for entry in entries:
            yield entry, *decode(entry)
        return
    # Bounded look-ahead: decoded 4K clips are large, so never more than workers + 1 in memory.
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        pending: deque = deque()
        todo = iter(entries)
        for entry in todo:
            pending.append((entry, pool.submit(decode, entry)))
            if len(pending) > workers:
                break
        while pending:
            entry, future = pending.popleft()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(decode, nxt)))
            yield entry, *future.result()


def prepare_shards(
    entries: Sequence[VideoListEntry],
    out_dir: str | os.PathLike,
    *,
    vae: torch.nn.Module,
    text_cache: PromptEmbeddingCache,
    spec: ModelSpec,
    height: int,
    width: int,
    frames: int,
    fps: float | None,
    start: float = 0.0,
    max_upscale: float = 1.0,
    samples_per_shard: int = 64,
    tiled: bool = True,
    tile_size: int | None = None,
    tile_stride: int | None = None,
    latent_dtype: torch.dtype = torch.float32,
    decode_workers: int = 2,
    progress: bool = True,
    info: dict[str, Any] | None = None,
) -> PrepareResult:
    """Decode, encode and write videos to latent shards; resumable and tolerant of bad inputs.

    Inputs are processed in list order in chunks of ``samples_per_shard``; chunk ``i`` becomes
    ``shard-{i:06d}.tar``, written under a temporary name and renamed once complete, next to a
    ``shard-{i:06d}.stats.json`` with its skipped inputs. A rerun skips every chunk whose shard exists, so an
    interrupted run resumes where it stopped. Bad inputs (no caption, unreadable or truncated video, too few
    frames, too small) are skipped and recorded, never fatal. At the end ``skipped.jsonl`` and
    ``manifest.json`` describe the whole data set.

    Args:
        entries: Inputs from :func:`read_video_list`.
        out_dir: Output folder (created).
        vae: The Wan VAE, on the device and dtype to encode with.
        text_cache: Prompt embeddings (dedupes prompts; may hold a disk cache).
        spec: Model preset; checks the video size and the VAE/text encoder against it.
        height: Clip height in pixels.
        width: Clip width in pixels.
        frames: Frames per clip (``4k + 1``).
        fps: Frame rate to sample clips at; None uses each video's own rate.
        start: Clip start time in seconds.
        max_upscale: Largest allowed resize factor (1.0: smaller videos are skipped as too small).
        samples_per_shard: Inputs per chunk (= per shard, minus skipped ones).
        tiled: Encode with spatial VAE tiling.
        tile_size: VAE tile size in pixels (None: diffusers default).
        tile_stride: VAE tile stride in pixels (None: diffusers default).
        latent_dtype: dtype the latents are stored in.
        decode_workers: Background threads decoding the next videos while the VAE encodes.
        progress: Show a progress bar.
        info: Extra fields for the manifest (e.g. model paths, the list file).

    Raises:
        ValueError: If the settings do not fit the preset or differ from those of existing shards in
            ``out_dir``.
    """
    clip = {
        "spec": spec,
        "height": height,
        "width": width,
        "frames": frames,
        "fps": fps,
        "start": start,
        "max_upscale": max_upscale,
        "samples_per_shard": samples_per_shard,
    }
    latent_shape = check_prepare_arguments(
        **clip, tile_size=tile_size, tile_stride=tile_stride, decode_workers=decode_workers
    )
    z_dim = getattr(getattr(vae, "config", None), "z_dim", spec.vae_channels)
    if z_dim != spec.vae_channels:
        raise ValueError(f"VAE has z_dim={z_dim} but preset {spec.name} expects {spec.vae_channels} channels")
    encoder = text_cache.encoder
    if encoder is not None and encoder.dim != spec.text_dim:
        raise ValueError(f"text encoder has dim {encoder.dim} but preset {spec.name} expects {spec.text_dim}")

    out_dir = Path(out_dir)
    settings = {
        **prepare_settings(entries, **clip, latent_dtype=latent_dtype),
        "vae": module_fingerprint(vae),
        "text_encoder": text_cache.identity,
        "text_len": text_cache.max_length,
    }
    check_existing_settings(out_dir, settings)
    out_dir.mkdir(parents=True, exist_ok=True)

    def write_settings() -> None:
        # With the first finished shard, not before: a run that fails (or is killed) before finishing one
        # leaves nothing to protect, so a corrected command must not be refused.
        if not (out_dir / SETTINGS_FILE).is_file():
            write_json_atomic(out_dir / SETTINGS_FILE, settings)

    for stale in out_dir.glob(".shard-*.tar.tmp"):  # left by a run that was killed mid-shard
        logger.info("removing unfinished %s", stale.name)
        stale.unlink()

    clip_kwargs = dict(
        num_frames=frames, height=height, width=width, target_fps=fps, start=start, max_upscale=max_upscale
    )
    chunks = [entries[i : i + samples_per_shard] for i in range(0, len(entries), samples_per_shard)]
    shards: list[Path] = []
    skipped: list[dict[str, Any]] = []
    samples = reused = 0
    bar = tqdm(total=len(entries), desc="prepare", unit="video", disable=not progress)
    for chunk_index, chunk in enumerate(chunks):
        shard = out_dir / f"shard-{chunk_index:06d}.tar"
        stats_file = out_dir / f"shard-{chunk_index:06d}.stats.json"
        if shard.is_file() and stats_file.is_file():
            stats = json.loads(stats_file.read_text())
            logger.info("%s: complete (%d samples), skipped", shard.name, stats["samples"])
            reused += 1
            bar.update(len(chunk))
        else:
            stats = _prepare_chunk(
                chunk_index,
                chunk,
                shard,
                stats_file,
                vae=vae,
                text_cache=text_cache,
                latent_shape=latent_shape,
                clip_kwargs=clip_kwargs,
                tiled=tiled,
                tile_size=tile_size,
                tile_stride=tile_stride,
                latent_dtype=latent_dtype,
                decode_workers=decode_workers,
                bar=bar,
                before_publish=write_settings,
            )
        shards.append(shard)
        samples += stats["samples"]
        skipped += stats["skipped"]
        bar.set_postfix(samples=samples, skipped=len(skipped))
    bar.close()

    by_reason = Counter(record["reason"] for record in skipped)
    manifest = {
        **settings,
        **(info or {}),
        "num_shards": len(shards),
        "num_samples": samples,
        "num_skipped": len(skipped),
        "skipped_by_reason": dict(sorted(by_reason.items())),
        "latent_shape": list(latent_shape),
        "latent_channels": latent_shape[0],
        "text_dim": spec.text_dim,
        "shards": [s.name for s in shards],
    }
    write_jsonl_atomic(out_dir / "skipped.jsonl", skipped)
    write_json_atomic(out_dir / "manifest.json", manifest)
    _log_skipped(skipped, out_dir / "skipped.jsonl")
    logger.info(
        "%s: %d samples in %d shards (%d reused), %d of %d inputs skipped",
        out_dir,
        samples,
        len(shards),
        reused,
        len(skipped),
        len(entries),
    )
    return PrepareResult(shards=shards, samples=samples, skipped=skipped, reused=reused, manifest=manifest)


def _skip_record(entry: VideoListEntry, reason: str, detail: str) -> dict[str, Any]:
    return {
        "index": entry.index,
        "path": entry.source,
        "reason": reason,
        "detail": detail,
        "where": entry.where,
    }


def _prepare_chunk(
    chunk_index: int,
    chunk: Sequence[VideoListEntry],
    shard: Path,
    stats_file: Path,
    *,
    vae: torch.nn.Module,
    text_cache: PromptEmbeddingCache,
    latent_shape: tuple[int, ...],
    clip_kwargs: dict[str, Any],
    tiled: bool,
    tile_size: int | None,
    tile_stride: int | None,
    latent_dtype: torch.dtype,
    decode_workers: int,
    bar: tqdm,
    before_publish: Callable[[], None],
) -> dict[str, Any]:
    """Build one shard from one chunk of inputs; returns its stats (also written to ``stats_file``).

    ``before_publish`` runs when the shard is complete, before its stats and the shard itself appear.
    """
    from t3.models.vae import encode_video  # deferred: diffusers is slow to import and readers never need it

    skipped: list[dict[str, Any]] = []
    usable: list[VideoListEntry] = []
    for entry in chunk:
        if entry.error is not None:
            skipped.append(_skip_record(entry, "bad_entry", entry.error))
        elif entry.caption is None:
            skipped.append(_skip_record(entry, "missing_caption", "no caption"))
        else:
            usable.append(entry)
    bar.update(len(chunk) - len(usable))

    # All prompts of the chunk in one call: the cache dedupes them and batches the encoder.
    embeddings, masks = text_cache.get([e.caption for e in usable]) if usable else (None, None)
    samples = 0
    # One ShardWriter per chunk, limited to one shard: the chunk index names the shard, which makes resuming
    # a matter of checking which shards exist. It writes under a hidden temporary name, renamed when done.
    import webdataset  # here, not at the top: see t3.data.shards._webdataset

    writer = webdataset.ShardWriter(
        str(shard.parent / ".shard-%06d.tar.tmp"),
        start_shard=chunk_index,
        maxcount=len(chunk) + 1,
        maxsize=float("inf"),
        verbose=0,
    )
    tmp = Path(writer.fname)
    try:
        for i, (entry, clip, error) in enumerate(_decoded_clips(usable, decode_workers, **clip_kwargs)):
            bar.update(1)
            if error is not None:
                skipped.append(_skip_record(entry, error.reason, error.detail))
                logger.debug("skipping %s (%s): %s", entry.source, error.reason, error.detail)
                continue
            latents = encode_video(
                vae, clip.video[None], tiled=tiled, tile_size=tile_size, tile_stride=tile_stride
            )
            latents = latents[0].to(device="cpu", dtype=latent_dtype)
            if tuple(latents.shape) != tuple(latent_shape):
                raise RuntimeError(
                    f"{entry.source}: VAE gave latents {tuple(latents.shape)}, expected {latent_shape}"
                )
            meta = {
                "source": entry.source,
                "index": entry.index,
                "fps": clip.fps,
                "num_frames": clip_kwargs["num_frames"],
                "height": clip_kwargs["height"],
                "width": clip_kwargs["width"],
                "start": clip_kwargs["start"],
                "frame_indices": clip.frame_indices,
                "source_fps": clip.source_fps,
                "source_frames": clip.source_frames,
                "source_height": clip.source_height,
                "source_width": clip.source_width,
            }
            writer.write(
                encode_sample(
                    f"{entry.index:09d}",
                    latents=latents,
                    text=embeddings[i],
                    text_mask=masks[i],
                    caption=entry.caption,
                    meta=meta,
                    text_len=text_cache.max_length,
                )
            )
            samples += 1
    except BaseException:
        with contextlib.suppress(Exception):
            writer.close()
        tmp.unlink(missing_ok=True)  # never leave a partial shard behind
        raise
    writer.close()
    stats = {"shard": shard.name, "inputs": len(chunk), "samples": samples, "skipped": skipped}
    before_publish()
    # The stats file goes first: a shard that exists always has its stats.
    write_json_atomic(stats_file, stats)
    os.replace(tmp, shard)
    logger.info("%s: %d samples, %d skipped", shard.name, samples, len(skipped))
    return stats


def _log_skipped(skipped: list[dict[str, Any]], where: Path, limit: int = 50) -> None:
    if not skipped:
        return
    by_reason = Counter(record["reason"] for record in skipped)
    logger.warning(
        "skipped %d input(s): %s (all listed in %s)",
        len(skipped),
        ", ".join(f"{r}={n}" for r, n in sorted(by_reason.items())),
        where,
    )
    for record in skipped[:limit]:
        logger.warning(
            "  %s %s: %s (%s)", record["where"], record["path"] or "-", record["reason"], record["detail"]
        )
    if len(skipped) > limit:
        logger.warning("  ... and %d more", len(skipped) - limit)

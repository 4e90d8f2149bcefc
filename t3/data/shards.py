"""Training samples in webdataset tar shards: the schema, a fault-tolerant streaming reader and the writers.

Sample schema
-------------
A training sample is a dict::

    {
        "__key__":   str,                        # unique within the data set, no dots
        "latents":   Tensor [C, T', H', W'],     # normalised VAE latents ((z - mean) / std)
        "text":      Tensor [L, D],              # umT5 embeddings, zero-padded to L = text_len (512)
        "text_mask": BoolTensor [L],             # True on the prompt's own tokens
        "caption":   str,
        "meta":      dict,                       # source, fps, num_frames, height, width, frame_indices, ...
    }

In a shard, each sample is four tar members sharing the key::

    {key}.latents.safetensors   {"latents": [C, T', H', W']}
    {key}.text.safetensors      {"text": [n, D]}  only the prompt's n tokens; padding is rebuilt on read
    {key}.caption.txt           UTF-8
    {key}.json                  the ``meta`` dict

safetensors is used for tensors: no pickle (safe on untrusted shards), a length-checked header (truncation is
detected, not misread), and fast zero-parse loading.

Reading
-------
:func:`build_latent_dataset` streams shards with webdataset: deterministic shard shuffling, disjoint shards per
DDP rank and per dataloader worker, a seeded sample shuffle buffer, then resolution buckets
(:mod:`t3.data.buckets`). Bad data never stops a run: unreadable shards and tar members go through the
webdataset ``handler`` hook and every sample passes :func:`decode_sample`; whatever fails is skipped, counted
by reason in a :class:`SkipCounter` and logged with its shard and key.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import hashlib
import io
import json
import logging
import os
import random
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from tqdm.auto import tqdm

from t3.data.buckets import BucketBatcher, consecutive_batches
from t3.data.video import Clip, ClipError, read_clip
from t3.io import write_text_atomic

if TYPE_CHECKING:
    import webdataset as wds

    from t3.models.presets import ModelSpec
    from t3.models.text_encoder import PromptEmbeddingCache


def _webdataset():
    """webdataset, imported only where shards are read or written, so that training from other sources
    (synthetic data) also runs where it is not installed (the GPU kit's machine: benchmarks/gpu/)."""
    import webdataset

    return webdataset


__all__ = [
    "SCHEMA_VERSION",
    "SKIPPED_KEY",
    "SKIP_REASONS",
    "LatentShardDataset",
    "SampleError",
    "SkipCounter",
    "PrepareResult",
    "VideoListEntry",
    "allowed_latent_shapes",
    "build_latent_dataset",
    "check_existing_settings",
    "check_shard_source",
    "check_prepare_arguments",
    "decode_sample",
    "encode_sample",
    "list_shards",
    "module_fingerprint",
    "prepare_settings",
    "prepare_shards",
    "read_manifest",
    "read_video_list",
    "write_shards",
]

logger = logging.getLogger(__name__)

#: Version of the on-disk layout, stored in every sample's metadata and the manifest.
SCHEMA_VERSION = 1

#: Tar member suffixes of one sample (webdataset lower-cases suffixes when grouping members into samples).
LATENTS, TEXT, CAPTION, META = "latents.safetensors", "text.safetensors", "caption.txt", "json"
FIELDS = (LATENTS, TEXT, CAPTION, META)

#: Reasons a sample or shard is skipped: a tar or shard could not be read; a field is missing or empty; a
#: field cannot be decoded; a tensor has the wrong rank or size (or latents of a shape the shard set or the
#: model does not allow); latents or text contain NaN/inf.
SKIP_REASONS = ("read_error", "missing_field", "decode_error", "bad_shape", "non_finite")

DEFAULT_TEXT_LEN = 512

#: Every item the reader yields carries ``{reason: count}`` of the skips since the previous item of this
#: reader (process), so that skips can be totalled across dataloader workers and ranks.
SKIPPED_KEY = "__skipped__"


class SampleError(ValueError):
    """A sample that cannot be used; ``reason`` is one of :data:`SKIP_REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


# --- schema: encode / decode ------------------------------------------------------------------------------


def encode_sample(
    key: str,
    *,
    latents: torch.Tensor,
    text: torch.Tensor,
    caption: str,
    meta: dict[str, Any] | None = None,
    text_mask: torch.Tensor | None = None,
    text_len: int = DEFAULT_TEXT_LEN,
) -> dict[str, Any]:
    """Serialise one sample into tar members for ``wds.ShardWriter``/``wds.TarWriter``.

    Args:
        key: Sample key; must not contain dots (webdataset splits member names at the first dot).
        latents: Normalised latents ``[C, T', H', W']``.
        text: Embeddings ``[L, D]``; with ``text_mask``, only the masked (prompt) rows are stored.
        caption: The prompt.
        meta: JSON-serialisable metadata; ``latent_shape``, ``text_tokens``, ``text_len`` and
            ``schema_version`` are added.
        text_mask: ``[L]`` bool, True on the prompt tokens (a prefix). None stores ``text`` as is.
        text_len: Padded text length the reader restores.

    Returns:
        ``{"__key__": key, "latents.safetensors": bytes, "text.safetensors": bytes, "caption.txt": str,
        "json": str}``.

    Raises:
        ValueError: For a bad key or tensor shapes.
    """
    if not key or "." in key or "/" in key:
        raise ValueError(f"sample key {key!r} must be non-empty without '.' or '/'")
    if latents.ndim != 4:
        raise ValueError(f"sample {key}: latents must be [C, T, H, W], got shape {tuple(latents.shape)}")
    if text.ndim != 2:
        raise ValueError(f"sample {key}: text must be [L, D], got shape {tuple(text.shape)}")
    if text_mask is not None:
        text = text[: int(text_mask.sum())]
    if len(text) > text_len:
        raise ValueError(f"sample {key}: {len(text)} text tokens exceed text_len={text_len}")
    meta = dict(meta or {})
    meta.update(
        latent_shape=list(latents.shape),
        text_tokens=len(text),
        text_len=text_len,
        schema_version=SCHEMA_VERSION,
    )
    return {
        "__key__": key,
        LATENTS: save_safetensors({"latents": latents.detach().cpu().contiguous()}),
        TEXT: save_safetensors({"text": text.detach().cpu().contiguous()}),
        CAPTION: caption,
        META: json.dumps(meta),
    }


def _as_text(value: bytes | str) -> str:
    """Member contents as text: bytes from a tar, or str straight from :func:`encode_sample`."""
    return value if isinstance(value, str) else bytes(value).decode("utf-8")


def _load_tensor(raw: dict[str, Any], field: str, name: str) -> torch.Tensor:
    try:
        tensors = load_safetensors(bytes(raw[field]))
    except Exception as err:  # SafetensorError for truncated/garbage bytes; its type is not public API
        first_line = (str(err).splitlines() or [type(err).__name__])[0]
        raise SampleError("decode_error", f"{field}: {first_line}") from err
    if name not in tensors:
        raise SampleError("decode_error", f"{field}: no tensor {name!r} (has {sorted(tensors)})")
    return tensors[name]


def decode_sample(
    raw: dict[str, Any],
    *,
    text_len: int | None = None,
    text_dim: int | None = None,
    latent_channels: int | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Decode and validate the raw tar members of one sample.

    Args:
        raw: ``{"__key__": ..., "latents.safetensors": bytes, ...}`` as grouped by webdataset.
        text_len: Padded text length; None takes the sample's ``meta["text_len"]`` (default 512).
        text_dim: Expected embedding size ``D``; None accepts any.
        latent_channels: Expected latent channels ``C``; None accepts any.
        dtype: Cast latents and text to this floating dtype; None keeps the stored one.

    Returns:
        A sample in the schema of this module.

    Raises:
        SampleError: With the reason and the offending field.
    """
    missing = [field for field in FIELDS if field not in raw]
    if missing:
        raise SampleError("missing_field", f"missing {', '.join(missing)}")

    try:
        meta = json.loads(_as_text(raw[META]))
    except Exception as err:  # UnicodeDecodeError or JSONDecodeError
        raise SampleError("decode_error", f"{META}: {err}") from err
    if not isinstance(meta, dict):
        raise SampleError("decode_error", f"{META}: expected an object, got {type(meta).__name__}")
    try:
        caption = _as_text(raw[CAPTION]).strip()
    except UnicodeDecodeError as err:
        raise SampleError("decode_error", f"{CAPTION}: {err}") from err
    if not caption:
        raise SampleError("missing_field", f"{CAPTION} is empty")

    latents = _load_tensor(raw, LATENTS, "latents")
    text = _load_tensor(raw, TEXT, "text")
    if latents.ndim != 4:
        raise SampleError("bad_shape", f"latents must be 4-D [C, T, H, W], got {tuple(latents.shape)}")
    if latent_channels is not None and latents.shape[0] != latent_channels:
        raise SampleError(
            "bad_shape", f"latents have {latents.shape[0]} channels, expected {latent_channels}"
        )
    if not (latents.is_floating_point() and text.is_floating_point()):
        raise SampleError(
            "decode_error", f"tensors must be floating point, got {latents.dtype}, {text.dtype}"
        )
    length = text_len or meta.get("text_len") or DEFAULT_TEXT_LEN
    if not isinstance(length, int) or length < 1:
        raise SampleError("decode_error", f"{META}: text_len must be a positive int, got {length!r}")
    if text.ndim != 2 or not 1 <= text.shape[0] <= length:
        raise SampleError("bad_shape", f"text must be [n <= {length}, D], got {tuple(text.shape)}")
    if text_dim is not None and text.shape[1] != text_dim:
        raise SampleError("bad_shape", f"text dim is {text.shape[1]}, expected {text_dim}")
    if not (torch.isfinite(latents).all() and torch.isfinite(text).all()):
        raise SampleError("non_finite", "latents or text contain NaN/inf")

    if dtype is not None:
        latents, text = latents.to(dtype), text.to(dtype)
    padded = text.new_zeros(length, text.shape[1])
    padded[: len(text)] = text
    mask = torch.zeros(length, dtype=torch.bool)
    mask[: len(text)] = True
    return {
        "__key__": raw["__key__"],
        "__url__": raw.get("__url__", ""),
        "latents": latents,
        "text": padded,
        "text_mask": mask,
        "caption": caption,
        "meta": meta,
    }


# --- skip statistics --------------------------------------------------------------------------------------


class SkipCounter:
    """Counts skipped samples/shards by reason, keeps a few examples and logs them.

    Also a webdataset exception handler (``handler=counter.handler``): it records the error as
    ``"read_error"`` and tells webdataset to continue with the next member or shard.

    In a ``DataLoader`` with workers each worker process has its own copy; each logs its own summary, and
    :meth:`take_unreported` passes the counts on with the items (``__skipped__``) for a total.

    Args:
        max_examples: Examples kept per reason.
        log_first: Skips logged at WARNING per reason; later ones go to DEBUG to keep logs readable.

    Attributes:
        counts: Skips per reason.
        examples: Up to ``max_examples`` ``"<shard>:<key>: <detail>"`` strings per reason.
    """

    def __init__(self, max_examples: int = 5, log_first: int = 10) -> None:
        self.max_examples = max_examples
        self.log_first = log_first
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self._unreported: Counter[str] = Counter()

    @property
    def total(self) -> int:
        """Number of skips recorded."""
        return sum(self.counts.values())

    def reset(self) -> None:
        """Forget everything recorded so far."""
        self.counts.clear()
        self.examples.clear()

    def add(self, reason: str, where: str, detail: str) -> None:
        """Record one skip.

        Args:
            reason: Short tag, e.g. one of :data:`SKIP_REASONS`.
            where: Shard and key (``"shard-000001.tar:000000042"``) or a file name.
            detail: What was wrong.
        """
        self.counts[reason] += 1
        self._unreported[reason] += 1
        message = f"{where}: {detail}"
        examples = self.examples.setdefault(reason, [])
        if len(examples) < self.max_examples:
            examples.append(message)
        level = logging.WARNING if self.counts[reason] <= self.log_first else logging.DEBUG
        logger.log(level, "skipping %s (%s)", message, reason)

    def take_unreported(self) -> dict[str, int]:
        """Skips recorded since the last call, by reason (kept across :meth:`reset`), then forgotten.

        The reader attaches them to the next item it yields, so a consumer in another process (a dataloader
        worker's reader is a copy) can total every worker's skips.
        """
        taken = dict(self._unreported)
        self._unreported.clear()
        return taken

    def handler(self, exn: BaseException) -> bool:
        """webdataset handler: count the error as ``"read_error"`` and continue."""
        # webdataset appends the url (and stream) to exn.args; the first arg is the message.
        args = list(getattr(exn, "args", ()))
        url = next((a for a in reversed(args[1:]) if isinstance(a, str)), "?")
        message = next((a for a in args if isinstance(a, str) and a != url), None) or str(exn)
        detail = f"{type(exn).__name__}: {message}"
        self.add("read_error", Path(url).name if url != "?" else url, detail)
        return True

    def summary(self) -> str:
        """One line: total and counts by reason."""
        if not self.counts:
            return "no samples skipped"
        parts = ", ".join(f"{reason}={n}" for reason, n in sorted(self.counts.items()))
        return f"{self.total} skipped ({parts})"

    def log_summary(self, what: str = "epoch") -> None:
        """Log the summary at INFO (WARNING if anything was skipped) with one example per reason."""
        if not self.counts:
            logger.info("%s: no samples skipped", what)
            return
        first = "; ".join(f"{reason}: {ex[0]}" for reason, ex in sorted(self.examples.items()) if ex)
        logger.warning("%s: %s; e.g. %s", what, self.summary(), first)


# --- writing ----------------------------------------------------------------------------------------------


def write_shards(
    samples: Iterable[dict[str, Any]],
    out_dir: str | os.PathLike,
    *,
    maxcount: int = 1000,
    maxsize: float = 3e9,
    pattern: str = "shard-%06d.tar",
    text_len: int = DEFAULT_TEXT_LEN,
) -> list[Path]:
    """Write samples in the schema of this module to tar shards with ``wds.ShardWriter``.

    Args:
        samples: Samples with ``__key__``, ``latents``, ``text`` (+ optional ``text_mask``), ``caption`` and
            optional ``meta`` (e.g. from :class:`t3.data.synthetic.SyntheticLatentDataset`).
        out_dir: Output folder (created).
        maxcount: Samples per shard at most.
        maxsize: Bytes per shard at most (approximately).
        pattern: Shard file name pattern.
        text_len: Padded text length recorded for the reader.

    Returns:
        The shard files written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    wds = _webdataset()
    # verbose=0: ShardWriter would otherwise print one line per shard.
    with wds.ShardWriter(
        str(out_dir / pattern),
        maxcount=maxcount,
        maxsize=maxsize,
        verbose=0,
        post=lambda f: written.append(Path(f)),
    ) as sink:
        for sample in samples:
            sink.write(
                encode_sample(
                    sample["__key__"],
                    latents=sample["latents"],
                    text=sample["text"],
                    caption=sample["caption"],
                    meta=sample.get("meta"),
                    text_mask=sample.get("text_mask"),
                    text_len=text_len,
                )
            )
    logger.info("wrote %d shard(s) to %s", len(written), out_dir)
    return written


def module_fingerprint(module: torch.nn.Module) -> str:
    """A short hash of a model's config, dtype and a few weights: equal fingerprints give equal outputs.

    Used to key caches of encoder outputs; independent of where the model was loaded from.
    """
    digest = hashlib.sha256()
    config = getattr(module, "config", None)
    if config is not None:
        items = dict(config)
        items = {k: v for k, v in items.items() if not k.startswith("_")}
        digest.update(json.dumps(items, sort_keys=True, default=str).encode())
    state = module.state_dict()
    names = sorted(state)
    for name in names[:2] + names[-2:]:  # a sample of tensors stands in for all the weights (cheap)
        digest.update(name.encode())
        digest.update(str(state[name].dtype).encode())
        digest.update(state[name].detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


# --- reading ----------------------------------------------------------------------------------------------


def allowed_latent_shapes(spec: ModelSpec, sizes: Sequence[Sequence[int]]) -> list[list[int]]:
    """Latent shapes ``[C, T', H', W']`` of video sizes ``[[num_frames, height, width], ...]`` on ``spec``.

    Raises:
        ValueError: For a size the model cannot take (naming it).
    """
    shapes = []
    for size in sizes:
        if len(size) != 3:
            raise ValueError(f"sizes: expected [num_frames, height, width], got {list(size)}")
        frames, height, width = (int(n) for n in size)
        shape = spec.latent_shape(frames, height, width)
        spec.token_grid(shape)
        shapes.append(list(shape))
    return shapes


def list_shards(urls_or_dir: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Resolve shards: a folder (its ``*.tar`` files, sorted), a file, a brace pattern or a list.

    Raises:
        FileNotFoundError: If a folder holds no ``.tar`` files.
    """
    if isinstance(urls_or_dir, (list, tuple)):
        return [str(u) for u in urls_or_dir]
    source = str(urls_or_dir)
    if os.path.isdir(source):
        shards = sorted(glob.glob(os.path.join(source, "*.tar")))
        if not shards:
            raise FileNotFoundError(f"no .tar shards in {source}")
        return shards
    return _webdataset().shardlists.expand_urls(source)


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def check_shard_source(urls_or_dir: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """:func:`list_shards`, checked on the file system: the source must exist now.

    The reader itself skips a shard it cannot open (``read_error``: bad data never stops a run); this is the
    start-up check that the data a run is pointed at is there at all. Remote URLs (``pipe:``, ``s3://`` ...)
    are not checked.

    Raises:
        FileNotFoundError: One line: no such file or folder, a folder without ``.tar`` shards, or how many
            files of a list or brace pattern are missing (and the first one).
    """
    urls = list_shards(urls_or_dir)
    missing = [url for url in urls if not _is_remote(url) and not os.path.exists(url)]
    if missing:
        if len(urls) == 1:
            raise FileNotFoundError("no such file or folder")
        raise FileNotFoundError(
            f"{len(missing)} of {len(urls)} shard files do not exist (first: {missing[0]})"
        )
    return urls


def read_manifest(urls_or_dir: str | os.PathLike | Sequence[str | os.PathLike]) -> dict[str, Any]:
    """The ``manifest.json`` next to the shards (written by ``data/prepare.py``), or ``{}`` if there is none."""
    if isinstance(urls_or_dir, (list, tuple)):
        if not urls_or_dir:
            return {}
        urls_or_dir = Path(str(urls_or_dir[0])).parent
    path = Path(str(urls_or_dir))
    manifest = (path if path.is_dir() else path.parent) / "manifest.json"
    if not manifest.is_file():
        return {}
    try:
        return json.loads(manifest.read_text())
    except (OSError, ValueError) as err:
        logger.warning("ignoring unreadable %s: %s", manifest, err)
        return {}


class LatentShardDataset(torch.utils.data.IterableDataset):
    """Stream training samples (or bucketed batches) from latent shards; see :func:`build_latent_dataset`.

    Iteration order depends only on ``seed``, the epoch (:meth:`set_epoch`), the DDP rank and the worker id,
    so a run with the same seed and world size sees the same batches.

    Besides the arguments of :func:`build_latent_dataset` (``preset`` as a name), ``latent_shapes`` are the
    allowed latent shapes (None: any) and ``latent_shapes_from`` says where they came from, for messages.

    Attributes:
        skips: Skip statistics of the current (or last) pass in this process.
        urls: The shard list.
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        batch_size: int | None = None,
        shuffle_buffer: int = 0,
        seed: int = 0,
        shuffle_shards: bool = True,
        split_by_node: bool = True,
        split_by_worker: bool = True,
        bucket: bool = True,
        drop_last: bool = False,
        text_len: int | None = None,
        text_dim: int | None = None,
        latent_channels: int | None = None,
        dtype: torch.dtype | None = None,
        latent_shapes: Sequence[Sequence[int]] | None = None,
        latent_shapes_from: str = "the allowed shapes",
        preset: str | None = None,
    ) -> None:
        super().__init__()
        if not urls:
            raise ValueError("LatentShardDataset: empty shard list")
        self.urls = list(urls)
        self.batch_size = batch_size
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.shuffle_shards = shuffle_shards
        self.split_by_node = split_by_node
        self.split_by_worker = split_by_worker
        self.bucket = bucket
        self.drop_last = drop_last
        self.text_len = text_len
        self.text_dim = text_dim
        self.latent_channels = latent_channels
        self.dtype = dtype
        self.latent_shapes = None if latent_shapes is None else [[int(n) for n in sh] for sh in latent_shapes]
        self.latent_shapes_from = latent_shapes_from
        self.preset = preset  # a name, not a ModelSpec: the dataset is pickled into dataloader workers
        self._shape_problems: dict[tuple[int, ...], str | None] = {}
        self.epoch = 0
        self.skips = SkipCounter()

    def set_epoch(self, epoch: int) -> None:
        """Select the shard and sample order of ``epoch`` (call before each epoch, like a DistributedSampler)."""
        self.epoch = epoch

    def _rng_seed(self, *parts: int) -> int:
        # A stable integer from (seed, epoch, ...); Python's hash() of tuples is not stable across processes.
        text = ":".join(str(p) for p in (self.seed, self.epoch, *parts))
        return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")

    def _shape_problem(self, shape: tuple[int, ...]) -> str | None:
        """Why latents of ``shape`` cannot be trained on here (None if they can); cached per shape."""
        if shape not in self._shape_problems:
            problem = None
            if self.latent_shapes is not None and list(shape) not in self.latent_shapes:
                problem = (
                    f"latents {list(shape)} are not among {self.latent_shapes_from} {self.latent_shapes}"
                )
            elif self.preset is not None:
                from t3.models.presets import get_spec

                try:
                    get_spec(self.preset).token_grid(shape)
                except ValueError as err:
                    problem = str(err)
            self._shape_problems[shape] = problem
        return self._shape_problems[shape]

    def _decode(self, raws: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Pipeline stage: decode and validate; bad samples are counted and dropped."""
        expect = {
            "text_len": self.text_len,
            "text_dim": self.text_dim,
            "latent_channels": self.latent_channels,
        }
        for raw in raws:
            where = f"{Path(str(raw.get('__url__', '?'))).name}:{raw.get('__key__', '?')}"
            try:
                sample = decode_sample(raw, **expect, dtype=self.dtype)
            except SampleError as err:
                self.skips.add(err.reason, where, err.detail)
                continue
            except Exception as err:  # nothing in a sample's bytes may stop a training run
                self.skips.add("decode_error", where, f"{type(err).__name__}: {err}")
                continue
            problem = self._shape_problem(tuple(sample["latents"].shape))
            if problem is not None:
                self.skips.add("bad_shape", where, problem)
                continue
            if None in expect.values():
                # Without a manifest, the first good sample fixes the sizes the others must match (so that
                # every batch can be stacked).
                found = {
                    "text_len": sample["text"].shape[0],
                    "text_dim": sample["text"].shape[1],
                    "latent_channels": sample["latents"].shape[0],
                }
                expect = {name: found[name] if value is None else value for name, value in expect.items()}
                logger.info("expecting %s (from %s)", expect, where)
            yield sample

    def _pipeline(self) -> wds.DataPipeline:
        wds = _webdataset()
        rank, world_size, worker, num_workers = wds.utils.pytorch_worker_info()
        readers = (world_size if self.split_by_node else 1) * (num_workers if self.split_by_worker else 1)
        if len(self.urls) < readers:
            logger.warning(
                "%d shard(s) for %d readers (ranks x workers): some readers get no data",
                len(self.urls),
                readers,
            )
        # The shard permutation uses the same seed on every rank and worker, so the splits stay disjoint.
        stages: list[Any] = [
            wds.SimpleShardList(self.urls, seed=self._rng_seed() if self.shuffle_shards else None)
        ]
        if self.split_by_node:
            stages.append(wds.split_by_node)
        if self.split_by_worker:
            stages.append(wds.split_by_worker)
        stages += [wds.tarfile_to_samples(handler=self.skips.handler), self._decode]
        if self.shuffle_buffer > 1:
            rng = random.Random(self._rng_seed(rank, worker))
            stages.append(wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 100), rng=rng))
        if self.batch_size:
            if self.bucket:
                stages.append(BucketBatcher(self.batch_size, drop_last=self.drop_last))
            else:
                size, drop = self.batch_size, self.drop_last
                stages.append(lambda src: consecutive_batches(src, size, drop_last=drop))
        return wds.DataPipeline(*stages)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.skips.reset()
        count, finished = 0, False
        try:
            for item in self._pipeline():
                count += 1
                item[SKIPPED_KEY] = self.skips.take_unreported()
                yield item
            finished = True
        finally:
            # Also when the consumer stops early (a step cap per epoch), so skips are always reported.
            rank, _, worker, _ = _webdataset().utils.pytorch_worker_info()
            what = "batches" if self.batch_size else "samples"
            end = "" if finished else " (stopped early)"
            self.skips.log_summary(f"epoch {self.epoch} (rank {rank}, worker {worker}): {count} {what}{end}")


def build_latent_dataset(
    urls_or_dir: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    shuffle_buffer: int = 0,
    seed: int = 0,
    batch_size: int | None = None,
    split_by_node: bool = True,
    split_by_worker: bool = True,
    bucket: bool = True,
    drop_last: bool = False,
    shuffle_shards: bool = True,
    text_len: int | None = None,
    text_dim: int | None = None,
    latent_channels: int | None = None,
    dtype: torch.dtype | None = None,
    preset: str | None = None,
    sizes: Sequence[Sequence[int]] | None = None,
) -> LatentShardDataset:
    """A streaming dataset over latent shards.

    Use it with ``DataLoader(dataset, batch_size=None, num_workers=...)``: batching (and bucketing) happens
    inside the dataset, after the split by rank and worker, so every batch holds one latent grid size.

    Args:
        urls_or_dir: A shard folder, a shard file, a brace pattern (``"shards/shard-{000000..000009}.tar"``)
            or a list of shard paths.
        shuffle_buffer: Samples in the shuffle buffer; 0 or 1 keeps the stored order.
        seed: Seed of the shard and sample shuffling.
        batch_size: Yield batches of this size; None yields single samples.
        split_by_node: Give each DDP rank a disjoint subset of the shards.
        split_by_worker: Give each dataloader worker a disjoint subset of its rank's shards.
        bucket: Batch by latent shape (:class:`~t3.data.buckets.BucketBatcher`); False batches consecutive
            samples, which must then all have the same shape.
        drop_last: Drop the partial batches left at the end of an epoch.
        shuffle_shards: Shuffle the shard order (per epoch, from ``seed``).
        text_len: Padded text length; None uses the manifest, then each sample's metadata (default 512).
        text_dim: Expected text embedding size; None uses the manifest, else the first good sample.
        latent_channels: Expected latent channels; None uses the manifest, else the first good sample.
        dtype: Cast latents and text to this dtype; None keeps the stored dtype.
        preset: The model the samples are for (`t3.models.preset_names`): latents it cannot take (channel
            count, patch multiples, more positions per axis than its rotary embedding covers) and text of
            another size are skipped as ``bad_shape``. None checks only what the shards say of themselves.
        sizes: Allowed video sizes ``[[num_frames, height, width], ...]`` in pixels (needs ``preset``):
            latents of any other shape are skipped as ``bad_shape``. Several sizes are resolution buckets.
            None allows the ``latent_shape`` of the shards' ``manifest.json``, or any shape without one.
    """
    urls = list_shards(urls_or_dir)
    manifest = read_manifest(urls_or_dir)
    spec = None
    if preset is not None:
        from t3.models.presets import get_spec

        spec = get_spec(preset)
    if sizes is not None:
        if spec is None:
            raise ValueError("build_latent_dataset: sizes need a preset to turn pixels into latent shapes")
        latent_shapes: list | None = allowed_latent_shapes(spec, sizes)
        shapes_from = f"the sizes {[list(size) for size in sizes]} ([frames, height, width]), i.e."
    else:
        latent_shapes = [manifest["latent_shape"]] if manifest.get("latent_shape") else None
        shapes_from = "the shapes of manifest.json"
    dataset = LatentShardDataset(
        urls,
        batch_size=batch_size,
        shuffle_buffer=shuffle_buffer,
        seed=seed,
        shuffle_shards=shuffle_shards,
        split_by_node=split_by_node,
        split_by_worker=split_by_worker,
        bucket=bucket,
        drop_last=drop_last,
        text_len=text_len or manifest.get("text_len"),
        text_dim=text_dim or manifest.get("text_dim") or (spec.text_dim if spec else None),
        latent_channels=latent_channels
        or manifest.get("latent_channels")
        or (spec.vae_channels if spec else None),
        dtype=dtype,
        latent_shapes=latent_shapes,
        latent_shapes_from=shapes_from,
        preset=spec.name if spec else None,
    )
    logger.info("latent dataset: %d shard(s) from %s", len(urls), urls_or_dir)
    return dataset


# --- building shards from videos (the logic of data/prepare.py) -------------------------------------------


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


def _write_json_atomic(path: Path, data: Any, *, lines: bool = False) -> None:
    text = "".join(json.dumps(record) + "\n" for record in data) if lines else json.dumps(data, indent=2)
    write_text_atomic(path, text)


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
            _write_json_atomic(out_dir / SETTINGS_FILE, settings)

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
    _write_json_atomic(out_dir / "skipped.jsonl", skipped, lines=True)
    _write_json_atomic(out_dir / "manifest.json", manifest)
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
    writer = _webdataset().ShardWriter(
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
    _write_json_atomic(stats_file, stats)
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

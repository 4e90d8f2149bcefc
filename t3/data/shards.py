"""Training samples in webdataset tar shards: the schema, its writer and a fault-tolerant streaming reader.

Shards from raw videos (``data/prepare.py``) are built by :mod:`t3.data.shard_writer`.

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

import glob
import hashlib
import itertools
import json
import logging
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from t3.data.buckets import BucketBatcher, consecutive_batches
from t3.data.skips import SKIPPED_KEY, SkipCounter

if TYPE_CHECKING:
    import webdataset as wds

    from t3.models.presets import ModelSpec


def _webdataset():
    """webdataset, imported only where shards are read or written, so that training from other sources
    (synthetic data) also runs where it is not installed (the GPU kit's machine: benchmarks/gpu/)."""
    import webdataset

    return webdataset


__all__ = [
    "SCHEMA_VERSION",
    "LatentShardDataset",
    "SampleError",
    "allowed_latent_shapes",
    "build_latent_dataset",
    "check_shard_source",
    "decode_sample",
    "encode_sample",
    "list_shards",
    "module_fingerprint",
    "read_manifest",
    "write_shards",
]

logger = logging.getLogger(__name__)

#: Version of the on-disk layout, stored in every sample's metadata and the manifest.
SCHEMA_VERSION = 1

#: Tar member suffixes of one sample (webdataset lower-cases suffixes when grouping members into samples).
LATENTS, TEXT, CAPTION, META = "latents.safetensors", "text.safetensors", "caption.txt", "json"
FIELDS = (LATENTS, TEXT, CAPTION, META)

DEFAULT_TEXT_LEN = 512


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
    so a run with the same seed and world size sees the same batches. The rank and world size are the
    process's own unless :meth:`set_data_parallel` names others (under sequence parallelism the ranks of
    an SP group read one stream).

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
        self.data_parallel: tuple[int, int] | None = None

    def set_data_parallel(self, rank: int, world_size: int) -> None:
        """Split the shards as reader ``rank`` of ``world_size`` instead of by the process's own rank."""
        self.data_parallel = (rank, world_size)

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
        if self.data_parallel is not None:
            rank, world_size = self.data_parallel
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
        if self.split_by_node and world_size > 1:
            stages.append(lambda urls: itertools.islice(urls, rank, None, world_size))
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

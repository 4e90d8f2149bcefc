"""Resolution buckets: batch samples so that every batch holds a single latent grid size.

Videos of different resolutions or lengths give latents of different shapes, which cannot be stacked into one
tensor, and padding them would waste attention compute on empty tokens. :class:`BucketBatcher` keeps one open
batch per latent shape, emits a batch as soon as its bucket is full and flushes the partial buckets at the end
of the stream (one epoch), unless ``drop_last`` is set.

Bucket order is deterministic: a batch is emitted at the moment its bucket fills, and leftovers are flushed in
the order their buckets were (re)opened, so the same input stream always gives the same batches.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from typing import Any

import torch

__all__ = ["BucketBatcher", "collate_samples", "consecutive_batches", "latent_shape_key"]

logger = logging.getLogger(__name__)

Sample = dict[str, Any]


def latent_shape_key(sample: Sample) -> tuple[int, ...]:
    """Bucket key of a sample: its latent shape ``(C, T', H', W')``."""
    return tuple(sample["latents"].shape)


def collate_samples(samples: Sequence[Sample]) -> dict[str, Any]:
    """Stack samples of one latent shape into a batch.

    Args:
        samples: Samples in the schema of :mod:`t3.data.shards` (``latents``, ``text``, ``text_mask``,
            ``caption``, ``meta``, ``__key__``).

    Returns:
        ``{"latents": [B, C, T', H', W'], "text": [B, L, D], "text_mask": [B, L], "caption": [str],
        "meta": [dict], "__key__": [str]}``.

    Raises:
        ValueError: If the samples do not share one latent and text shape.
    """
    if not samples:
        raise ValueError("collate_samples: no samples")
    for name in ("latents", "text"):
        shapes = {tuple(s[name].shape) for s in samples}
        if len(shapes) > 1:
            keys = [s.get("__key__", "?") for s in samples]
            raise ValueError(
                f"collate_samples: {name} shapes differ within a batch {sorted(shapes)} (keys {keys})"
            )
    return {
        "latents": torch.stack([s["latents"] for s in samples]),
        "text": torch.stack([s["text"] for s in samples]),
        "text_mask": torch.stack([s["text_mask"] for s in samples]),
        "caption": [s["caption"] for s in samples],
        "meta": [s.get("meta", {}) for s in samples],
        "__key__": [s.get("__key__", "") for s in samples],
    }


class BucketBatcher:
    """Group a sample stream into batches of one latent shape each.

    Usable as a webdataset pipeline stage: ``batcher(samples)`` returns an iterator over batches.

    Args:
        batch_size: Samples per batch.
        key: Bucket key of a sample (default: its latent shape).
        collate: Turns a list of samples into a batch (default :func:`collate_samples`).
        drop_last: Drop the partial buckets left at the end of the stream instead of emitting them.

    Attributes:
        batches_per_bucket: Batches emitted per bucket key in the last pass.
        dropped: Samples dropped by ``drop_last`` in the last pass.
    """

    def __init__(
        self,
        batch_size: int,
        *,
        key: Callable[[Sample], Hashable] = latent_shape_key,
        collate: Callable[[list[Sample]], Any] = collate_samples,
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.key = key
        self.collate = collate
        self.drop_last = drop_last
        self.batches_per_bucket: dict[Hashable, int] = {}
        self.dropped = 0

    def __call__(self, samples: Iterable[Sample]) -> Iterator[Any]:
        self.batches_per_bucket = {}
        self.dropped = 0
        buckets: dict[Hashable, list[Sample]] = {}
        for sample in samples:
            key = self.key(sample)
            bucket = buckets.setdefault(key, [])
            bucket.append(sample)
            if len(bucket) == self.batch_size:
                del buckets[key]  # a later sample of this shape reopens it at the end of the flush order
                yield self._emit(key, bucket)
        # End of the stream (epoch): flush what is left, in a deterministic order.
        for key, bucket in buckets.items():
            if self.drop_last:
                self.dropped += len(bucket)
                logger.debug("dropping partial bucket %s with %d samples", key, len(bucket))
            else:
                yield self._emit(key, bucket)

    def _emit(self, key: Hashable, bucket: list[Sample]) -> Any:
        self.batches_per_bucket[key] = self.batches_per_bucket.get(key, 0) + 1
        return self.collate(bucket)


def consecutive_batches(
    samples: Iterable[Sample],
    batch_size: int,
    *,
    collate: Callable[[list[Sample]], Any] = collate_samples,
    drop_last: bool = False,
) -> Iterator[Any]:
    """Batch consecutive samples without bucketing (every sample must have the same shape).

    Raises:
        ValueError: From ``collate`` when a batch mixes shapes; use :class:`BucketBatcher` for such data.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batch: list[Sample] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == batch_size:
            yield collate(batch)
            batch = []
    if batch and not drop_last:
        yield collate(batch)

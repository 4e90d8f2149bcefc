"""Training data: latent shards (schema, writer, fault-tolerant streaming reader), resolution buckets, clip
decoding and a synthetic moving-shape source for tests and CPU demos.

* :mod:`t3.data.shards`: the sample schema, :func:`write_shards` and :func:`build_latent_dataset`.
* :mod:`t3.data.shard_writer`: :func:`prepare_shards`, shards from raw videos (the logic of ``data/prepare.py``).
* :mod:`t3.data.skips`: why samples are skipped and the counter that totals skips.
* :mod:`t3.data.buckets`: batching by latent shape.
* :mod:`t3.data.video`: :func:`load_clip` and its error types.
* :mod:`t3.data.synthetic`: procedural videos with captions, as pixels or as encoded samples.
* :mod:`t3.data.factories`: the Hydra ``_target_``s of ``conf/data/*.yaml`` that build these readers
  for a run (imported by path, not re-exported here).
"""

from __future__ import annotations

from t3.data.buckets import BucketBatcher, collate_samples, consecutive_batches, latent_shape_key
from t3.data.shard_writer import (
    PrepareResult,
    VideoListEntry,
    check_existing_settings,
    check_prepare_arguments,
    prepare_settings,
    prepare_shards,
    read_video_list,
)
from t3.data.shards import (
    SCHEMA_VERSION,
    LatentShardDataset,
    SampleError,
    allowed_latent_shapes,
    build_latent_dataset,
    check_shard_source,
    decode_sample,
    encode_sample,
    list_shards,
    read_manifest,
    write_shards,
)
from t3.data.skips import SKIP_REASONS, SKIPPED_KEY, SkipCounter
from t3.data.synthetic import SyntheticLatentDataset, SyntheticVideoDataset, synthetic_video
from t3.data.video import (
    Clip,
    ClipError,
    TooFewFramesError,
    UnreadableVideoError,
    VideoTooSmallError,
    load_clip,
    read_clip,
)

__all__ = [
    "SCHEMA_VERSION",
    "SKIPPED_KEY",
    "SKIP_REASONS",
    "BucketBatcher",
    "Clip",
    "ClipError",
    "LatentShardDataset",
    "PrepareResult",
    "SampleError",
    "SkipCounter",
    "SyntheticLatentDataset",
    "SyntheticVideoDataset",
    "TooFewFramesError",
    "UnreadableVideoError",
    "VideoListEntry",
    "VideoTooSmallError",
    "allowed_latent_shapes",
    "build_latent_dataset",
    "check_existing_settings",
    "check_prepare_arguments",
    "check_shard_source",
    "collate_samples",
    "consecutive_batches",
    "decode_sample",
    "encode_sample",
    "latent_shape_key",
    "list_shards",
    "load_clip",
    "prepare_settings",
    "prepare_shards",
    "read_clip",
    "read_manifest",
    "read_video_list",
    "synthetic_video",
    "write_shards",
]

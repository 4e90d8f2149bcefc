"""Dataset factories: the Hydra ``_target_``s of ``conf/data/*.yaml``.

Each turns a ``data`` config node into a reader of `t3.data`: `synthetic_latents` (procedural videos,
encoded with the model's VAE and text encoder), `held_out_shards` (latent shards for the validation loss,
or none) and `prepare_video_shards` (raw videos encoded into latent shards once, before training).
Training wraps the readers in resumable, rank-aware loaders (`t3.training.datamodule`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset

__all__ = ["held_out_shards", "prepare_video_shards", "synthetic_latents"]

logger = logging.getLogger(__name__)


def synthetic_latents(
    num_samples: int,
    *,
    height: int,
    width: int,
    num_frames: int,
    seed: int,
    model: Mapping[str, Any],
    cache_dir: str,
    fps: float = 16.0,
) -> Dataset:
    """Procedural moving-shape videos encoded with the model's VAE and text encoder (`t3.data`).

    Each sample is encoded once and cached on disk under ``cache_dir/synthetic``, so reruns and other
    ranks reuse it.

    Args:
        num_samples: Videos in the set.
        height: Frame height in pixels.
        width: Frame width in pixels.
        num_frames: Frames per video (``4k + 1``).
        seed: Seed of the set (a different seed gives a disjoint-looking set, e.g. for validation).
        model: The ``model`` config (preset, ``vae_path``, ``text_encoder_path``).
        cache_dir: Cache root (``paths.cache_dir``).
        fps: Nominal frame rate.
    """
    from t3.data import SyntheticLatentDataset
    from t3.models.encoders import vae_and_text_encoder

    vae, text_encoder = vae_and_text_encoder(model, cache_dir)
    return SyntheticLatentDataset(
        num_samples,
        vae=vae,
        text_encoder=text_encoder,
        frames=num_frames,
        height=height,
        width=width,
        seed=seed,
        fps=fps,
        cache_dir=Path(cache_dir) / "synthetic",
        tiled=height * width > 512 * 512,  # the VAE needs tiles only for large frames
    )


def held_out_shards(urls_or_dir: str | None, **kwargs: Any) -> IterableDataset | None:
    """``t3.data.build_latent_dataset`` for validation, or None (no validation loss) without shards.

    Args:
        urls_or_dir: Held-out shards; None disables the validation loss.
        **kwargs: Passed to ``build_latent_dataset``.
    """
    if urls_or_dir is None:
        return None
    from t3.data import build_latent_dataset

    return build_latent_dataset(urls_or_dir, **kwargs)


def prepare_video_shards(
    video_list: str,
    out_dir: str,
    *,
    height: int,
    width: int,
    num_frames: int,
    fps: float | None,
    model: Mapping[str, Any],
    samples_per_shard: int = 64,
    max_upscale: float = 1.0,
) -> Path:
    """Encode the videos of ``video_list`` into latent shards in ``out_dir`` (`t3.data.prepare_shards`).

    Runs once, on global rank 0, before training (Lightning's ``prepare_data``); it is resumable, so a
    restarted run only encodes what is missing.

    Args:
        video_list: CSV (``path,caption``), JSON lines or JSON array of videos and captions.
        out_dir: Shard folder.
        height: Clip height in pixels.
        width: Clip width in pixels.
        num_frames: Frames per clip.
        fps: Frame rate to sample clips at; None keeps each video's own.
        model: The ``model`` config (preset, ``vae_path``, ``text_encoder_path``).
        samples_per_shard: Videos per shard.
        max_upscale: Largest resize factor allowed (smaller videos are skipped).
    """
    from t3.data import check_prepare_arguments, prepare_shards, read_video_list
    from t3.models import PromptEmbeddingCache, get_spec
    from t3.models.encoders import vae_and_text_encoder

    spec = get_spec(model["preset"])
    check_prepare_arguments(  # before the encoders are loaded
        spec,
        height=height,
        width=width,
        frames=num_frames,
        fps=fps,
        max_upscale=max_upscale,
        samples_per_shard=samples_per_shard,
        name=lambda key: f"data.prepare.{'num_frames' if key == 'frames' else key}",
    )
    entries = read_video_list(video_list)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    vae, text_encoder = vae_and_text_encoder(model, Path(out_dir).parent)
    vae = vae.to(device)
    text_encoder.to(device)
    result = prepare_shards(
        entries,
        out_dir,
        vae=vae,
        text_cache=PromptEmbeddingCache(text_encoder, max_length=spec.text_len),
        spec=spec,
        height=height,
        width=width,
        frames=num_frames,
        fps=fps,
        samples_per_shard=samples_per_shard,
        max_upscale=max_upscale,
        info={"video_list": str(video_list)},
    )
    logger.info("prepared latent shards in %s: %s", out_dir, result)
    return Path(out_dir)

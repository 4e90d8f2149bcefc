"""The Wan video VAE (``diffusers.AutoencoderKLWan``): local loading, (tiled) encode/decode, latent scaling.

The DiT works on *normalised* latents: ``(z - latents_mean) / latents_std`` with per-channel statistics from
the VAE config, exactly as ``WanPipeline`` (decode) and ``WanVideoToVideoPipeline`` (encode) do. The helpers
here always return/accept normalised latents unless told otherwise, so callers cannot forget the scaling.

High-resolution frames do not fit through the VAE at once; ``tiled=True`` uses diffusers' own spatial tiling
(``AutoencoderKLWan.enable_tiling``: overlapping tiles, linearly blended) for the duration of one call and then
restores the VAE's previous tiling settings.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan

__all__ = [
    "decode_latents",
    "denormalize_latents",
    "encode_video",
    "latents_stats",
    "load_vae",
    "normalize_latents",
    "vae_tiling",
]

logger = logging.getLogger(__name__)

_EXPECTED = (
    "expected a diffusers AutoencoderKLWan folder with config.json and diffusion_pytorch_model.safetensors"
)
_TILE_ATTRS = (
    "use_tiling",
    "tile_sample_min_height",
    "tile_sample_min_width",
    "tile_sample_stride_height",
    "tile_sample_stride_width",
)


def load_vae(path: str | os.PathLike, *, dtype: torch.dtype | None = None) -> AutoencoderKLWan:
    """Load a Wan VAE from a local diffusers folder (or a pipeline folder with a ``vae/`` subfolder).

    Args:
        path: Folder with ``config.json`` and ``diffusion_pytorch_model.safetensors``.
        dtype: Parameter dtype; None keeps the stored one. Wan pipelines run the VAE in float32.

    Returns:
        The VAE on CPU in eval mode.

    Raises:
        FileNotFoundError: If ``path`` has no VAE config.
        ValueError: If the config is not an ``AutoencoderKLWan`` config.
    """
    path = Path(path)
    if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
        path = path / "vae"
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"VAE not found: {path} ({_EXPECTED})")
    class_name = json.loads(config_file.read_text()).get("_class_name")
    if class_name not in (None, "AutoencoderKLWan"):
        raise ValueError(f"{config_file}: _class_name is {class_name!r}, expected 'AutoencoderKLWan'")
    vae = AutoencoderKLWan.from_pretrained(path, local_files_only=True, torch_dtype=dtype)
    logger.info("Loaded VAE from %s (z_dim=%d)", path, vae.config.z_dim)
    return vae.eval()


# --- latent normalisation ---------------------------------------------------------------------------------


def latents_stats(vae: AutoencoderKLWan, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(mean, std)`` from the VAE config, shaped ``[1, C, 1, 1, 1]`` like ``like``."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(like.device, like.dtype)
    std = torch.tensor(vae.config.latents_std).view(shape).to(like.device, like.dtype)
    return mean, std


def normalize_latents(vae: AutoencoderKLWan, latents: torch.Tensor) -> torch.Tensor:
    """Raw VAE latents -> the DiT's normalised latents: ``(z - mean) / std``."""
    mean, std = latents_stats(vae, latents)
    return (latents - mean) / std


def denormalize_latents(vae: AutoencoderKLWan, latents: torch.Tensor) -> torch.Tensor:
    """The DiT's normalised latents -> raw VAE latents: ``z * std + mean``."""
    mean, std = latents_stats(vae, latents)
    return latents * std + mean


# --- tiling -----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def vae_tiling(
    vae: AutoencoderKLWan,
    enabled: bool = True,
    tile_size: int | tuple[int, int] | None = None,
    tile_stride: int | tuple[int, int] | None = None,
) -> Iterator[AutoencoderKLWan]:
    """Temporarily switch the VAE's spatial tiling on (or off), restoring its settings on exit.

    Args:
        vae: The VAE.
        enabled: Tile (True) or process whole frames (False).
        tile_size: Tile ``(height, width)`` in *pixels*; an int for square tiles. None keeps the VAE's current
            value (diffusers default 256).
        tile_stride: Distance between tile starts in pixels (< ``tile_size``, the difference is the blended
            overlap). None keeps the VAE's current value (diffusers default 192).
    """
    saved = {name: getattr(vae, name) for name in _TILE_ATTRS if hasattr(vae, name)}
    if enabled and not hasattr(vae, "enable_tiling"):
        logger.debug("%s has no tiling support; running untiled", type(vae).__name__)
    try:
        if enabled and hasattr(vae, "enable_tiling"):
            size_h, size_w = _pair(tile_size)
            stride_h, stride_w = _pair(tile_stride)
            vae.enable_tiling(
                tile_sample_min_height=size_h,
                tile_sample_min_width=size_w,
                tile_sample_stride_height=stride_h,
                tile_sample_stride_width=stride_w,
            )
        elif "use_tiling" in saved:
            vae.use_tiling = False
        yield vae
    finally:
        for name, value in saved.items():
            setattr(vae, name, value)


def _pair(value: int | tuple[int, int] | None) -> tuple[int | None, int | None]:
    if value is None or isinstance(value, int):
        return value, value
    return value[0], value[1]


# --- encode / decode --------------------------------------------------------------------------------------


@torch.no_grad()
def encode_video(
    vae: AutoencoderKLWan,
    video: torch.Tensor,
    *,
    tiled: bool = True,
    tile_size: int | tuple[int, int] | None = None,
    tile_stride: int | tuple[int, int] | None = None,
    sample: bool = False,
    generator: torch.Generator | None = None,
    normalize: bool = True,
) -> torch.Tensor:
    """Encode pixels to (normalised) latents.

    Args:
        vae: The VAE.
        video: ``[B, 3, T, H, W]`` in ``[-1, 1]`` with ``T = 1 + 4k``.
        tiled: Encode in overlapping spatial tiles (needed for large frames).
        tile_size: Tile size in pixels (see :func:`vae_tiling`).
        tile_stride: Tile stride in pixels (see :func:`vae_tiling`).
        sample: Sample from the posterior instead of taking its mode (the pipelines' ``"argmax"``).
        generator: RNG for ``sample=True``.
        normalize: Return the DiT's normalised latents (True) or raw VAE latents.

    Returns:
        Latents ``[B, C, 1 + k, H / s, W / s]`` in the VAE's dtype.
    """
    param = next(vae.parameters())
    video = video.to(param.device, param.dtype)
    with vae_tiling(vae, tiled, tile_size, tile_stride):
        posterior = vae.encode(video).latent_dist
    latents = posterior.sample(generator=generator) if sample else posterior.mode()
    return normalize_latents(vae, latents) if normalize else latents


@torch.no_grad()
def decode_latents(
    vae: AutoencoderKLWan,
    latents: torch.Tensor,
    *,
    tiled: bool = True,
    tile_size: int | tuple[int, int] | None = None,
    tile_stride: int | tuple[int, int] | None = None,
    normalized: bool = True,
) -> torch.Tensor:
    """Decode (normalised) latents to pixels.

    Args:
        vae: The VAE.
        latents: ``[B, C, T', H', W']``.
        tiled: Decode in overlapping spatial tiles (needed for large frames).
        tile_size: Tile size in *pixels* (see :func:`vae_tiling`).
        tile_stride: Tile stride in pixels (see :func:`vae_tiling`).
        normalized: ``latents`` are the DiT's normalised latents (True) or raw VAE latents.

    Returns:
        Video ``[B, 3, T, H, W]`` clamped to ``[-1, 1]``, in the VAE's dtype.
    """
    param = next(vae.parameters())
    latents = latents.to(param.device, param.dtype)
    if normalized:
        latents = denormalize_latents(vae, latents)
    with vae_tiling(vae, tiled, tile_size, tile_stride):
        return vae.decode(latents, return_dict=False)[0]

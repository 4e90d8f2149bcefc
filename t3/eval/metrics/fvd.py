"""Fréchet Video Distance with the I3D TorchScript detector of StyleGAN-V: ``fvd_i3d`` and ``fvd_i3d_crop224``.

The detector is ``i3d_torchscript.pt``, the TorchScript port (by the StyleGAN-V authors,
universome/stylegan-v ``src/metrics/frechet_video_distance.py``) of the tf.hub model
``deepmind/i3d-kinetics-400/1`` that the original FVD code (google-research ``frechet_video_distance``)
uses. Its features are the 400 Kinetics-400 logits before the softmax (``return_features=True``; the
tf.hub ``RGB/inception_i3d/Mean`` tensor). It is loaded from a local path only; the file's sha256 is
checked against ``metrics.fvd_i3d.sha256`` when given, and always recorded.

Protocol of ``fvd_i3d`` (pinned; every value is written into ``results.json``):

* clip: ``num_frames`` = 16 frames at one effective frame rate ``fps`` (default 16) on both sides, from
  effective frame ``start`` = 0. Clip frame ``k`` shows time ``(start + k) / fps`` and takes the video frame
  nearest to it (`clip_indices`). Each video's own rate decides which frames those are: a generated video's
  is the rate its model generates motion at (``content_fps`` in its record: Wan2.1 16, Wan2.2 24), not the
  30 fps its mp4 is labelled with (the authors' saving protocol); a reference video's is its container's.
  Without this, 16 consecutive frames would span 1 s of a generated Wan2.1 video but 0.53 s of a 30 fps
  reference, and FVD would score the difference in speed. The default 16 is Wan2.1's native rate and the
  lowest of the supported models: no generated frame is dropped or repeated for Wan2.1, and sources at
  16 fps or more (Wan2.2's 24, references at 24-60) are only ever subsampled, never padded with repeated
  frames (videos below ``fps`` are still used, with frames repeated, and counted). StyleGAN-V
  (``fvd2048_16f``) takes 16 consecutive frames, from the start of generated videos and at a random offset
  in real ones, which assumes both sides share a frame rate; t3 starts at the same time on both sides so
  the value is deterministic. Videos shorter than the clip are left out and counted, as StyleGAN-V
  discards short videos;
* resize: every frame squashed to 224 x 224 (no crop; aspect ratio not kept), bilinear, as in the
  original FVD code (``tf.image.resize_bilinear`` to 224 x 224; StyleGAN-V leaves this step to the
  detector, ``resize=True``). One deliberate difference: t3 resizes with antialiasing, because from
  2176 x 3840 a plain bilinear resize reads 4 of the ~166 pixels behind each output pixel and the score
  would depend on aliasing;
* range: float32 in [-1, 1] (``x / 127.5 - 1`` of uint8 RGB), layout ``[B, 3, T, 224, 224]``;
* detector call: ``detector(x, rescale=False, resize=False, return_features=True)``. With those flags the
  TorchScript model expects exactly the tf.hub model's input (224 x 224, [-1, 1]); StyleGAN-V's own
  ``compare_models.py`` (universome/fvd-comparison) checks the two agree with these flags. StyleGAN-V's
  metric code instead passes uint8 with ``rescale=True, resize=True`` and lets the detector do both
  steps; t3 does them outside so it can antialias;
* statistics: feature mean and *unbiased* covariance (N - 1), Fréchet distance
  ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrt(S1 S2))`` with the trace of the square root from the eigenvalues of
  ``S1 S2`` in float64: torchmetrics' ``FrechetInceptionDistance`` machinery (its states are sums with
  ``dist_reduce_fx="sum"``, so statistics from several processes merge exactly). StyleGAN-V divides
  the covariance by N instead; the difference is O(1/N).
* number of videos: every complete generated video against every reference video. StyleGAN-V's
  ``fvd2048_16f`` uses 2048 videos per side; with ~100 videos per side FVD is strongly biased upwards
  and only comparable between runs with the same videos, never with published FVD2048 values.

``fvd_i3d_crop224`` sees 4K detail that a 224 x 224 downscale cannot: each video contributes
``tiles_per_video`` clips of 224 x 224 pixels cut at full resolution (no resizing) at positions drawn
from ``numpy.random.default_rng([seed, prompt index, video seed, is_reference])``, so the tiles do not
depend on the order or the process that reads the video. Everything else is as in ``fvd_i3d``.

Neither is a number from the T3 paper, which reports no FVD.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from t3.eval.metrics.base import WeightsError
from t3.io import sha256_file
from t3.video_io import uint8_to_pixels

__all__ = [
    "FVD_NAME",
    "FVD_TILED_NAME",
    "I3D_NUM_FEATURES",
    "FrechetVideoDistance",
    "I3DFeatures",
    "clip_indices",
    "load_i3d",
    "random_tiles",
    "resized_clip",
    "tile_positions",
]

logger = logging.getLogger(__name__)

FVD_NAME = "fvd_i3d"
FVD_TILED_NAME = "fvd_i3d_crop224"

#: Kinetics-400 logits: the feature size of the StyleGAN-V I3D detector with ``return_features=True``.
I3D_NUM_FEATURES = 400

#: Spatial size the I3D detector was trained on.
I3D_SIZE = 224

#: Keyword arguments of every detector call (see the module docstring).
DETECTOR_KWARGS: dict[str, bool] = {"rescale": False, "resize": False, "return_features": True}


def load_i3d(
    path: str | os.PathLike, *, sha256: str | None = None, device: torch.device | str = "cpu"
) -> tuple[nn.Module, str]:
    """Load the I3D TorchScript detector from a local file.

    Args:
        path: ``i3d_torchscript.pt``.
        sha256: Expected hex sha256 of the file; None only records it (with a warning).
        device: Where to put the detector.

    Returns:
        The detector in eval mode, and the file's actual sha256.

    Raises:
        WeightsError: If the hash does not match or the file is not a TorchScript archive.
    """
    path = Path(path)
    actual = sha256_file(path)
    if sha256 is not None and actual.lower() != str(sha256).lower():
        raise WeightsError(
            f"{path}: sha256 {actual} does not match metrics.fvd_i3d.sha256 {sha256}; "
            "is this StyleGAN-V's i3d_torchscript.pt?"
        )
    if sha256 is None:
        logger.warning(
            "fvd_i3d: no sha256 pinned for %s; its sha256 is %s (set metrics.fvd_i3d.sha256 to check it)",
            path,
            actual,
        )
    try:
        # The published detector exists only as TorchScript; torch's deprecation notice is no news here.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated")
            detector = torch.jit.load(str(path), map_location=torch.device(device))
    except (RuntimeError, ValueError) as err:
        raise WeightsError(f"{path}: not a TorchScript archive ({err})") from err
    return detector.eval(), actual


class I3DFeatures(nn.Module):
    """The torchmetrics feature module around the I3D detector: clips in, 400 logits out.

    Args:
        detector: The TorchScript I3D (or any module with its call signature).
        num_features: Feature size the detector returns.
    """

    def __init__(self, detector: nn.Module, num_features: int = I3D_NUM_FEATURES) -> None:
        super().__init__()
        self.detector = detector
        # torchmetrics reads this instead of pushing a dummy 299x299 image through the detector.
        self.num_features = int(num_features)

    @torch.no_grad()
    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        """``[B, 3, T, 224, 224]`` float in [-1, 1] -> ``[B, num_features]`` float32."""
        features = self.detector(clips, **DETECTOR_KWARGS)
        if features.dim() != 2 or features.shape[-1] != self.num_features:
            raise ValueError(
                f"the I3D detector returned features of shape {tuple(features.shape)}, "
                f"expected [batch, {self.num_features}]"
            )
        return features.float()


class FrechetVideoDistance(FrechetInceptionDistance):
    """torchmetrics' Fréchet distance over video clips, with I3D (or any) clip features.

    ``update(clips, real)`` takes preprocessed clips ``[B, 3, T, H, W]``; the states (feature sums, sums of
    outer products, counts) are float64 sums reduced with ``"sum"``, so ``compute`` after a distributed run
    equals the single-process value. torchmetrics' FID checks no image shapes when it is given a
    feature module with a ``num_features`` attribute, which is why this subclass only has to supply one.

    Args:
        feature: A module mapping a batch to ``[B, num_features]`` (`I3DFeatures` for FVD), with a
            ``num_features`` attribute.
        **kwargs: Passed to ``torchmetrics.Metric`` (``sync_on_compute``, ``process_group``, ...).
    """

    higher_is_better = False

    def __init__(self, feature: nn.Module, **kwargs: Any) -> None:
        if not isinstance(getattr(feature, "num_features", None), int):
            raise TypeError("FrechetVideoDistance needs a feature module with an int `num_features`")
        super().__init__(feature=feature, normalize=True, reset_real_features=True, **kwargs)


# --- clips ------------------------------------------------------------------------------------------------


def _rate(fps: float) -> Fraction:
    # Exact ratios for the usual rates (30000/1001 read back as 29.97...).
    return Fraction(fps).limit_denominator(1001)


def clip_indices(
    num_frames: int, clip_frames: int, *, source_fps: float, fps: float, start: int = 0
) -> list[int] | None:
    """Frame indices of a ``clip_frames`` clip at ``fps`` effective frames per second (see the module docstring).

    Clip frame ``k`` shows time ``(start + k) / fps``; it is the video frame nearest that time,
    ``round((start + k) * source_fps / fps)`` with halves rounded up. Equal rates give ``start, start + 1, ...``;
    a video at twice ``fps`` gives every other frame.

    Args:
        num_frames: Frames in the video.
        clip_frames: Frames in the clip.
        source_fps: The video's frame rate (its content's, for generated videos).
        fps: The effective frame rate of the clip.
        start: First clip frame, in frames at ``fps``.

    Returns:
        The indices, or None if the video is too short for the clip.
    """
    if not source_fps > 0 or not fps > 0:
        raise ValueError(f"frame rates must be > 0, got source {source_fps} and clip {fps}")
    step = _rate(source_fps) / _rate(fps)
    indices = [math.floor((start + k) * step + Fraction(1, 2)) for k in range(clip_frames)]
    return indices if indices[-1] < num_frames else None


def _to_unit_range(frames: torch.Tensor) -> torch.Tensor:
    """uint8 or float ``[T, 3, H, W]`` in [0, 255] -> ``[3, T, H, W]`` float in [-1, 1]."""
    return uint8_to_pixels(frames).permute(1, 0, 2, 3).contiguous()


def resized_clip(frames: np.ndarray, size: int = I3D_SIZE, *, chunk: int = 4) -> torch.Tensor:
    """The ``fvd_i3d`` input of one clip: frames squashed to ``size x size`` (bilinear, antialiased).

    Args:
        frames: uint8 RGB ``[T, H, W, 3]``.
        size: Output height and width.
        chunk: Frames resized at a time (bounds float32 memory at 4K).

    Returns:
        ``[3, T, size, size]`` float32 in [-1, 1].
    """
    out = []
    for start in range(0, len(frames), chunk):
        x = torch.from_numpy(np.ascontiguousarray(frames[start : start + chunk])).permute(0, 3, 1, 2).float()
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out.append(x.clamp_(0, 255))
    return _to_unit_range(torch.cat(out))


def tile_positions(
    height: int, width: int, count: int, rng_key: Sequence[int], size: int = I3D_SIZE
) -> list[tuple[int, int]]:
    """``count`` top-left corners ``(y, x)`` of ``size x size`` tiles inside a ``height x width`` frame."""
    if height < size or width < size:
        raise ValueError(f"frames of {height}x{width} are smaller than the {size}x{size} tiles")
    rng = np.random.default_rng([int(k) for k in rng_key])
    ys = rng.integers(0, height - size + 1, size=count)
    xs = rng.integers(0, width - size + 1, size=count)
    return [(int(y), int(x)) for y, x in zip(ys, xs, strict=True)]


def random_tiles(
    frames: np.ndarray, count: int, rng_key: Sequence[int], size: int = I3D_SIZE
) -> torch.Tensor:
    """The ``fvd_i3d_crop224`` input of one clip: ``count`` full-resolution tiles.

    Args:
        frames: uint8 RGB ``[T, H, W, 3]``.
        count: Tiles per clip.
        rng_key: Seed sequence of the tile positions (see the module docstring).
        size: Tile height and width.

    Returns:
        ``[count, 3, T, size, size]`` float32 in [-1, 1].
    """
    _, height, width, _ = frames.shape
    tiles = []
    for y, x in tile_positions(height, width, count, rng_key, size):
        tile = torch.from_numpy(np.ascontiguousarray(frames[:, y : y + size, x : x + size])).permute(
            0, 3, 1, 2
        )
        tiles.append(_to_unit_range(tile.float()))
    return torch.stack(tiles)

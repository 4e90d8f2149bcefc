"""Sample a training clip from a video file: pick frames at a target frame rate, resize, centre-crop.

:func:`load_clip` is the one entry point: it returns ``num_frames`` frames sampled at ``target_fps`` as a float
tensor ``[C, F, H, W]`` in ``[-1, 1]``, the input the Wan VAE expects. Frames are picked from the source by
nearest index (no frame interpolation), resized with antialiasing so the frame covers ``height x width``
(aspect ratio kept) and centre-cropped.

Every reason a file cannot give a clip raises a subclass of :class:`ClipError` carrying a short ``reason``
(``"unreadable"``, ``"too_few_frames"``, ``"too_small"``), so a data-preparation loop can count and skip them.

The rule between the two video modules: this one chooses a clip (which frames, at what size) and says why a
video cannot give one; opening files, decoding frames (decord, with PyAV as fallback) and the uint8 <->
``[-1, 1]`` conversion are `t3.video_io`'s. torchvision is deliberately not used.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from t3.video_io import (
    FrameIndexError,
    UndecodableVideoError,
    VideoInfo,
    VideoReader,
    uint8_to_pixels,
    with_video,
)

__all__ = [
    "Clip",
    "ClipError",
    "TooFewFramesError",
    "UnreadableVideoError",
    "VideoTooSmallError",
    "clip_frame_indices",
    "load_clip",
    "read_clip",
    "resize_crop",
]

logger = logging.getLogger(__name__)

# Frames resized per interpolate call: bounds peak memory for long 4K sources (float32 of 8 UHD frames ~ 800 MB).
_RESIZE_CHUNK = 8


# --- errors -----------------------------------------------------------------------------------------------


class ClipError(Exception):
    """A video cannot provide the requested clip; ``reason`` is a short tag for skip statistics.

    Args:
        path: The video file.
        detail: What is wrong, in a few words.
    """

    reason = "unreadable"

    def __init__(self, path: str | os.PathLike, detail: str) -> None:
        self.path = str(path)
        self.detail = detail
        super().__init__(f"{path}: {detail}")


class UnreadableVideoError(ClipError):
    """The file is missing, not a video, or cannot be decoded."""

    reason = "unreadable"


class TooFewFramesError(ClipError):
    """The video is too short for ``num_frames`` frames at ``target_fps`` from ``start``."""

    reason = "too_few_frames"


class VideoTooSmallError(ClipError):
    """The frames are smaller than the target size (beyond the allowed upscaling)."""

    reason = "too_small"


@dataclass(frozen=True)
class Clip:
    """A decoded clip and where it came from.

    Attributes:
        video: Float ``[3, F, H, W]`` in ``[-1, 1]``.
        frame_indices: Source frame index of each output frame.
        fps: Frame rate of the clip (the target rate, or the source rate if none was asked for).
        source_fps: Frame rate of the source video.
        source_frames: Number of frames in the source video.
        source_height: Source frame height in pixels.
        source_width: Source frame width in pixels.
        backend: ``"decord"`` or ``"pyav"``.
    """

    video: torch.Tensor
    frame_indices: list[int]
    fps: float
    source_fps: float
    source_frames: int
    source_height: int
    source_width: int
    backend: str


# --- frame selection and resizing -------------------------------------------------------------------------


def clip_frame_indices(
    num_frames: int, *, source_fps: float, target_fps: float | None = None, start: float = 0.0
) -> list[int]:
    """Source frame indices of a clip: ``num_frames`` frames at ``target_fps`` from time ``start``.

    Each output frame ``i`` sits at time ``start + i / target_fps`` and takes the nearest source frame, so a
    source faster than the target skips frames and a slower one repeats them.

    Args:
        num_frames: Frames in the clip.
        source_fps: Frame rate of the video.
        target_fps: Frame rate of the clip; None keeps the source rate (consecutive frames).
        start: Start time in seconds.

    Returns:
        Non-decreasing frame indices (may exceed the video's length; the caller checks).
    """
    first = round(start * source_fps)
    step = 1.0 if target_fps is None else source_fps / target_fps
    # floor(x + 0.5) rounds halves up; Python's round() would round them to even and jitter the spacing.
    return [first + math.floor(i * step + 0.5) for i in range(num_frames)]


def resize_crop(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize frames to cover ``height x width`` keeping the aspect ratio, then centre-crop.

    The crop is taken in source pixels first, so only the kept region is resized (cheaper for 4K sources).

    Args:
        frames: uint8 or float ``[N, 3, h, w]``.
        height: Output height.
        width: Output width.

    Returns:
        Float32 ``[N, 3, height, width]`` in the input's value range.
    """
    h, w = frames.shape[-2:]
    scale = max(height / h, width / w)
    crop_h = min(h, max(1, round(height / scale)))
    crop_w = min(w, max(1, round(width / scale)))
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    frames = frames[..., top : top + crop_h, left : left + crop_w]
    if (crop_h, crop_w) == (height, width):
        return frames.float()
    out = []
    for chunk in frames.split(_RESIZE_CHUNK):
        # antialias=True low-pass filters when shrinking, avoiding aliasing on fine detail.
        out.append(F.interpolate(chunk.float(), size=(height, width), mode="bilinear", antialias=True))
    return torch.cat(out)


# --- reading a clip ---------------------------------------------------------------------------------------


def read_clip(
    path: str | os.PathLike,
    *,
    num_frames: int,
    height: int,
    width: int,
    target_fps: float | None = None,
    start: float = 0.0,
    max_upscale: float = 1.0,
    backend: str = "auto",
) -> Clip:
    """Decode a clip and return it with its provenance (see :func:`load_clip` for the arguments).

    Args:
        path: Video file.
        num_frames: Frames in the clip, ``4k + 1`` (the Wan VAE keeps the first frame on its own).
        height: Output height in pixels.
        width: Output width in pixels.
        target_fps: Frame rate to sample at; None takes consecutive source frames.
        start: Start time in seconds.
        max_upscale: Largest allowed resize factor; the default 1.0 never upscales, so a source smaller than
            the target in either dimension is rejected.
        backend: ``"auto"`` (decord, then PyAV), ``"decord"`` or ``"pyav"``.

    Raises:
        ValueError: For invalid arguments (a programming error, not a bad video).
        UnreadableVideoError, TooFewFramesError, VideoTooSmallError: If the video cannot give the clip.
    """
    if num_frames < 1 or (num_frames - 1) % 4:
        raise ValueError(f"num_frames must be 4k + 1 (1, 5, 9, ...), got {num_frames}")
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be positive, got {height}x{width}")
    if target_fps is not None and not target_fps > 0:
        raise ValueError(f"target_fps must be > 0 or None, got {target_fps}")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    if backend not in ("auto", "decord", "pyav"):
        raise ValueError(f"backend must be 'auto', 'decord' or 'pyav', got {backend!r}")
    path = Path(path)
    if not path.is_file():
        raise UnreadableVideoError(path, "file not found")

    def clip_from(reader: VideoReader) -> Clip:
        source = reader.info
        indices = _check_source(path, source, num_frames, height, width, target_fps, start, max_upscale)
        try:
            frames = reader.frames(indices)
        except FrameIndexError as err:  # fewer decodable frames than the headers promised
            raise TooFewFramesError(path, str(err)) from None
        return _finish(frames, indices, source, height, width, target_fps, reader.backend)

    try:
        # Too few frames or too small: a property of the video, which the other decoder would confirm.
        return with_video(
            path, clip_from, backend=backend, final=(TooFewFramesError, VideoTooSmallError), decode_threads=1
        )
    except UndecodableVideoError as err:
        raise UnreadableVideoError(path, "cannot decode (" + "; ".join(err.reasons) + ")") from None


def _check_source(
    path: Path,
    source: VideoInfo,
    num_frames: int,
    height: int,
    width: int,
    target_fps: float | None,
    start: float,
    max_upscale: float,
) -> list[int]:
    """Validate the source against the request; returns the frame indices to decode."""
    if source.frames < 1 or source.height < 1 or source.width < 1:
        raise UnreadableVideoError(path, "no frames")
    if target_fps is not None or start > 0:
        if not (source.fps > 0 and math.isfinite(source.fps)):
            raise UnreadableVideoError(path, f"unknown frame rate ({source.fps})")
    fps = source.fps if source.fps > 0 else 1.0
    indices = clip_frame_indices(num_frames, source_fps=fps, target_fps=target_fps, start=start)
    if indices[-1] >= source.frames:
        raise TooFewFramesError(
            path,
            f"{source.frames} frames at {source.fps:g} fps, need frame {indices[-1]} "
            f"({num_frames} frames at {target_fps or source.fps:g} fps from {start:g} s)",
        )
    scale = max(height / source.height, width / source.width)
    if scale > max_upscale + 1e-6:
        raise VideoTooSmallError(
            path,
            f"{source.width}x{source.height} is too small for {width}x{height} "
            f"(needs upscaling x{scale:.2f}, max x{max_upscale:g})",
        )
    return indices


def _finish(
    frames: np.ndarray,
    indices: list[int],
    source: VideoInfo,
    height: int,
    width: int,
    target_fps: float | None,
    backend: str,
) -> Clip:
    video = resize_crop(torch.from_numpy(frames).permute(0, 3, 1, 2), height, width)
    video = uint8_to_pixels(video).permute(1, 0, 2, 3).contiguous()  # [3, F, H, W]
    return Clip(
        video=video,
        frame_indices=indices,
        fps=float(target_fps if target_fps is not None else source.fps),
        source_fps=source.fps,
        source_frames=source.frames,
        source_height=source.height,
        source_width=source.width,
        backend=backend,
    )


def load_clip(
    path: str | os.PathLike,
    *,
    num_frames: int,
    height: int,
    width: int,
    target_fps: float | None = None,
    start: float = 0.0,
    max_upscale: float = 1.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Decode ``num_frames`` frames at ``target_fps`` from ``start``, resized and centre-cropped.

    Args:
        path: Video file (any container FFmpeg reads).
        num_frames: Frames in the clip, ``4k + 1``.
        height: Output height in pixels.
        width: Output width in pixels.
        target_fps: Frame rate to sample at (nearest source frame); None takes consecutive source frames.
        start: Start time in seconds.
        max_upscale: Largest allowed resize factor (1.0: never upscale).
        backend: ``"auto"`` (decord, then PyAV), ``"decord"`` or ``"pyav"``.

    Returns:
        Float32 ``[3, num_frames, height, width]`` in ``[-1, 1]``.

    Raises:
        ValueError: For invalid arguments.
        UnreadableVideoError: Missing, corrupt or undecodable file.
        TooFewFramesError: The video is too short.
        VideoTooSmallError: The frames are smaller than the target size.
    """
    return read_clip(
        path,
        num_frames=num_frames,
        height=height,
        width=width,
        target_fps=target_fps,
        start=start,
        max_upscale=max_upscale,
        backend=backend,
    ).video

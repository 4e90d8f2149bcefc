"""Decode a training clip from a video file: pick frames at a target frame rate, resize, centre-crop.

:func:`load_clip` is the one entry point: it returns ``num_frames`` frames sampled at ``target_fps`` as a float
tensor ``[C, F, H, W]`` in ``[-1, 1]``, the input the Wan VAE expects. Frames are picked from the source by
nearest index (no frame interpolation), resized with antialiasing so the frame covers ``height x width``
(aspect ratio kept) and centre-cropped.

Every reason a file cannot give a clip raises a subclass of :class:`ClipError` carrying a short ``reason``
(``"unreadable"``, ``"too_few_frames"``, ``"too_small"``), so a data-preparation loop can count and skip them.

Decoding uses decord (seeks straight to the needed frames) and falls back to PyAV, which decodes sequentially,
when decord cannot open or decode the file. torchvision is deliberately not used.
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


# --- decoding ---------------------------------------------------------------------------------------------


@dataclass
class _Source:
    fps: float
    frames: int
    height: int
    width: int


def _open_decord(path: Path):
    import decord

    return decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)


def _probe_decord(reader) -> _Source:
    height, width = reader[0].shape[:2] if len(reader) else (0, 0)
    return _Source(float(reader.get_avg_fps()), len(reader), int(height), int(width))


def _probe_pyav(path: Path) -> _Source:
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise UnreadableVideoError(path, "no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        frames = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
        return _Source(
            float(rate) if rate else 0.0,
            int(frames),
            int(stream.codec_context.height),
            int(stream.codec_context.width),
        )


def _decode_pyav(path: Path, indices: list[int]) -> np.ndarray:
    """Decode frames ``indices`` (sorted, may repeat) sequentially with PyAV; stops after the last one."""
    import av

    wanted = set(indices)
    last = max(indices)
    got: dict[int, np.ndarray] = {}
    decoded = 0
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            decoded = i + 1
            if i in wanted:
                got[i] = frame.to_ndarray(format="rgb24")
            if i >= last:
                break
    if decoded <= last:
        raise TooFewFramesError(path, f"only {decoded} frames decodable, need frame {last}")
    return np.stack([got[i] for i in indices])


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

    errors: list[str] = []
    if backend in ("auto", "decord"):
        try:
            return _read_clip_decord(path, num_frames, height, width, target_fps, start, max_upscale)
        except (TooFewFramesError, VideoTooSmallError):
            raise  # a property of the video: PyAV would say the same
        except Exception as err:  # decord raises RuntimeError/DECORDError, or fails to import
            errors.append(f"decord: {err}".splitlines()[0])
            logger.debug("decord could not read %s (%s); trying PyAV", path, err)
    if backend in ("auto", "pyav"):
        try:
            return _read_clip_pyav(path, num_frames, height, width, target_fps, start, max_upscale)
        except ClipError:
            raise
        except Exception as err:  # FFmpeg errors come in many types
            errors.append(f"pyav: {err}".splitlines()[0])
    raise UnreadableVideoError(path, "cannot decode (" + "; ".join(errors) + ")")


def _check_source(
    path: Path,
    source: _Source,
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
    source: _Source,
    height: int,
    width: int,
    target_fps: float | None,
    backend: str,
) -> Clip:
    video = resize_crop(torch.from_numpy(frames).permute(0, 3, 1, 2), height, width)
    video = (video / 127.5 - 1.0).clamp_(-1.0, 1.0).permute(1, 0, 2, 3).contiguous()  # [3, F, H, W]
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


def _read_clip_decord(
    path: Path,
    num_frames: int,
    height: int,
    width: int,
    target_fps: float | None,
    start: float,
    max_upscale: float,
) -> Clip:
    reader = _open_decord(path)
    source = _probe_decord(reader)
    indices = _check_source(path, source, num_frames, height, width, target_fps, start, max_upscale)
    frames = reader.get_batch(indices).asnumpy()
    return _finish(frames, indices, source, height, width, target_fps, "decord")


def _read_clip_pyav(
    path: Path,
    num_frames: int,
    height: int,
    width: int,
    target_fps: float | None,
    start: float,
    max_upscale: float,
) -> Clip:
    source = _probe_pyav(path)
    indices = _check_source(path, source, num_frames, height, width, target_fps, start, max_upscale)
    frames = _decode_pyav(path, indices)
    return _finish(frames, indices, source, height, width, target_fps, "pyav")


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

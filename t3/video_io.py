"""Read and write mp4 videos as ``uint8 [F, H, W, 3]`` RGB arrays.

Writing uses PyAV with H.264 (``libx264``, ``yuv420p``) when the PyAV build has it and MPEG-4 part 2
otherwise. A video is encoded under a temporary name in the destination folder and moved into place with
`os.replace` only once complete, so an interrupted run never leaves a truncated mp4 that looks finished.

Reading uses decord (fast, frame-accurate) and falls back to PyAV if decord cannot open the file.
Both are imported only where a file is read or written, so that generation to latents and the GPU
kit (benchmarks/gpu/) run where they are not installed.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from t3.io import give_umask_mode

__all__ = ["VideoIOError", "VideoInfo", "available_encoder", "read_video", "video_info", "write_video"]

logger = logging.getLogger(__name__)

#: Encoders in order of preference: H.264 is what every player expects; MPEG-4 part 2 ships with every
#: FFmpeg build, so it is the fallback for PyAV builds without libx264.
ENCODERS: tuple[str, ...] = ("libx264", "mpeg4")

#: Default x264 constant rate factor: 18 is visually lossless for generated content and keeps files small.
DEFAULT_CRF = 18


class VideoIOError(OSError):
    """A video could not be written, opened or decoded."""


@dataclass(frozen=True)
class VideoInfo:
    """Basic facts about a video file."""

    frames: int
    height: int
    width: int
    fps: float


@functools.lru_cache(maxsize=1)
def available_encoder() -> str:
    """The first encoder of `ENCODERS` this PyAV build can write with."""
    import av

    for name in ENCODERS:
        try:
            av.codec.Codec(name, "w")
        except Exception:  # PyAV raises different types across versions for unknown codecs
            logger.debug("PyAV has no %s encoder", name)
            continue
        return name
    raise VideoIOError(f"this PyAV build has none of the encoders {list(ENCODERS)}")


def _as_frames(frames: np.ndarray | torch.Tensor, path: Path) -> np.ndarray:
    """Validates ``frames`` as a contiguous uint8 ``[F, H, W, 3]`` numpy array."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(
            f"write_video {path}: frames must have shape [F, H, W, 3], got {tuple(frames.shape)}"
        )
    if frames.dtype != np.uint8:
        raise ValueError(f"write_video {path}: frames must be uint8, got {frames.dtype}")
    num, height, width, _ = frames.shape
    if num < 1:
        raise ValueError(f"write_video {path}: no frames to write")
    # yuv420p stores chroma at half resolution, so encoders reject odd sizes.
    if height % 2 or width % 2:
        raise ValueError(
            f"write_video {path}: height and width must be even for yuv420p, got {height}x{width}"
        )
    return np.ascontiguousarray(frames)


def write_video(
    path: str | os.PathLike,
    frames: np.ndarray | torch.Tensor,
    fps: float,
    *,
    crf: int = DEFAULT_CRF,
) -> Path:
    """Write ``frames`` to an mp4 file at ``path``, atomically.

    Args:
        path: Destination ``.mp4`` file; its folder must exist. An existing file is replaced.
        frames: uint8 RGB frames ``[F, H, W, 3]`` (numpy array or tensor); H and W must be even.
        fps: Frame rate (> 0).
        crf: x264 constant rate factor (0 = lossless, 51 = worst); ignored by the MPEG-4 fallback.

    Returns:
        ``path`` as a `Path`.

    Raises:
        ValueError: For frames of the wrong shape or dtype, or a bad ``fps``.
        FileNotFoundError: If the destination folder does not exist.
        VideoIOError: If the file cannot be created or encoding fails.
    """
    path = Path(path)
    array = _as_frames(frames, path)
    if not fps > 0:
        raise ValueError(f"write_video {path}: fps must be > 0, got {fps}")
    folder = path.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"write_video {path}: folder {folder} does not exist")

    codec = available_encoder()
    num, height, width, _ = array.shape
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=folder)
    except OSError as err:
        raise VideoIOError(
            f"write_video {path}: cannot create a file in {folder}: {err.strerror or err}"
        ) from err
    os.close(fd)
    tmp = give_umask_mode(tmp_name)  # mkstemp's file is owner-only; a video is for colleagues too
    try:
        import av

        # The temporary name does not end in .mp4, so the container format is named explicitly.
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            if codec == "libx264":
                stream.options = {"crf": str(int(crf)), "preset": "medium"}
            else:
                # MPEG-4 part 2 has no CRF; ~0.3 bit per pixel keeps generated detail visible.
                stream.bit_rate = max(int(0.3 * width * height * fps), 1_000_000)
            for image in array:
                frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))  # flush the encoder's delayed frames
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(err, Exception) and not isinstance(err, VideoIOError):
            raise VideoIOError(f"write_video {path}: encoding with {codec} failed: {err}") from err
        raise
    logger.debug("wrote %s: %d frames %dx%d at %s fps (%s)", path, num, width, height, fps, codec)
    return path


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"video {path} does not exist")
    if not path.is_file():
        raise VideoIOError(f"video {path} is not a file")


def _read_with_decord(path: Path) -> np.ndarray:
    import decord

    reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
    if len(reader) == 0:
        raise VideoIOError(f"video {path} has no frames")
    return reader.get_batch(list(range(len(reader)))).asnumpy()


def _read_with_pyav(path: Path) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise VideoIOError(f"video {path} has no video stream")
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    if not frames:
        raise VideoIOError(f"video {path} has no frames")
    return np.stack(frames)


def read_video(path: str | os.PathLike) -> np.ndarray:
    """Decode every frame of a video.

    Args:
        path: A video file (any container FFmpeg reads).

    Returns:
        uint8 RGB frames ``[F, H, W, 3]``.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        VideoIOError: If neither decord nor PyAV can decode it.
    """
    path = Path(path)
    _check_readable(path)
    try:
        return _read_with_decord(path)
    except Exception as err:  # decord raises its own DECORDError or RuntimeError
        logger.debug("decord could not read %s (%s); trying PyAV", path, err)
    try:
        return _read_with_pyav(path)
    except VideoIOError:
        raise
    except Exception as err:  # PyAV's FFmpeg errors have many types
        raise VideoIOError(f"cannot decode video {path}: {err}") from err


def video_info(path: str | os.PathLike) -> VideoInfo:
    """Frame count, size and frame rate of a video, read from its headers (frames counted if missing).

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        VideoIOError: If the file is not a readable video.
    """
    import av

    path = Path(path)
    _check_readable(path)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoIOError(f"video {path} has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            num = stream.frames
            if not num:
                # Some containers do not record a frame count; count by demuxing (no decoding needed).
                num = sum(1 for packet in container.demux(stream) if packet.size)
            return VideoInfo(
                frames=int(num),
                height=int(stream.codec_context.height),
                width=int(stream.codec_context.width),
                fps=float(rate) if rate else 0.0,
            )
    except VideoIOError:
        raise
    except Exception as err:  # PyAV's FFmpeg errors have many types
        raise VideoIOError(f"cannot open video {path}: {err}") from err

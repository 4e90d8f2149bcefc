"""Video files <-> uint8 arrays, and the pixel range conversions between uint8 and the models' ``[-1, 1]``.

The rule: this is the one module that opens video files and converts pixel ranges. It knows what a file
holds (`video_info`, `VideoReader.info`), decodes the frames asked for (`read_frames`, `read_video`),
writes mp4s (`write_video`) and maps uint8 RGB to and from ``[-1, 1]`` (`uint8_to_pixels`,
`pixels_to_uint8`). Which frames to take, at what rate and size, is its callers' business:
`t3.data.video` samples training clips, the eval metrics pick their own frames.

Reading uses decord (fast, seeks straight to the frames asked for) and falls back to PyAV, which decodes
sequentially, when decord cannot open or decode the file (`with_video`). Writing uses PyAV with H.264
(``libx264``, ``yuv420p``) when the PyAV build has it and MPEG-4 part 2 otherwise; a video is encoded
under a temporary name in the destination folder and moved into place only once complete
(`t3.io.atomic_path`), so an interrupted run never leaves a truncated mp4 that looks finished.

decord and PyAV are imported only where a file is read or written, so that generation to latents and the
GPU kit (benchmarks/gpu/) run where they are not installed.
"""

from __future__ import annotations

import abc
import functools
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from t3.io import atomic_path

__all__ = [
    "BACKENDS",
    "FrameIndexError",
    "UndecodableVideoError",
    "VideoIOError",
    "VideoInfo",
    "VideoReader",
    "available_encoder",
    "frame_count",
    "open_video",
    "pixels_to_uint8",
    "read_frames",
    "read_video",
    "uint8_to_pixels",
    "video_info",
    "with_video",
    "write_video",
]

logger = logging.getLogger(__name__)

#: Decoders in the order `with_video` tries them.
BACKENDS: tuple[str, ...] = ("decord", "pyav")

#: Encoders in order of preference: H.264 is what every player expects; MPEG-4 part 2 ships with every
#: FFmpeg build, so it is the fallback for PyAV builds without libx264.
ENCODERS: tuple[str, ...] = ("libx264", "mpeg4")

#: Default x264 constant rate factor: 18 is visually lossless for generated content and keeps files small.
DEFAULT_CRF = 18

T = TypeVar("T")


class VideoIOError(OSError):
    """A video could not be written, opened or decoded."""


class FrameIndexError(VideoIOError):
    """A frame beyond the video's end was asked for: a property of the file, the same with every decoder."""


class UndecodableVideoError(VideoIOError):
    """No decoder could give what was asked; ``reasons`` holds one ``"<decoder>: <error>"`` per decoder."""

    def __init__(self, path: str | os.PathLike, reasons: Sequence[str]) -> None:
        self.reasons = list(reasons)
        super().__init__(f"cannot decode video {path} ({'; '.join(self.reasons)})")


@dataclass(frozen=True)
class VideoInfo:
    """Basic facts about a video file."""

    frames: int
    height: int
    width: int
    fps: float


# --- pixel ranges -----------------------------------------------------------------------------------------


def pixels_to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """Model pixels in ``[-1, 1]`` -> uint8 ``[0, 255]``, clamped and rounded (diffusers truncates); any layout."""
    return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def uint8_to_pixels(values: torch.Tensor) -> torch.Tensor:
    """uint8 (or float) values in ``[0, 255]`` -> float32 model pixels in ``[-1, 1]``; any layout."""
    return (values.float() / 127.5 - 1.0).clamp_(-1.0, 1.0)


# --- reading ----------------------------------------------------------------------------------------------


class VideoReader(abc.ABC):
    """An open video file: what it holds (`info`) and its frames at given indices (`frames`).

    Attributes:
        path: The file.
        backend: The decoder (an entry of `BACKENDS`).
    """

    backend: str

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    @abc.abstractmethod
    def info(self) -> VideoInfo:
        """Frame count, size and frame rate, as this decoder sees them."""

    @abc.abstractmethod
    def frames(self, indices: Sequence[int] | None = None) -> np.ndarray:
        """uint8 RGB ``[len(indices), H, W, 3]`` (every frame for None), in the order asked (repeats allowed).

        Raises:
            FrameIndexError: If an index is at or beyond the video's end.
        """

    def _out_of_range(self, count: int, index: int) -> FrameIndexError:
        return FrameIndexError(f"video {self.path} has {count} frames; frame {index} was asked for")


def _open_decord(path: Path, threads: int) -> Any:
    import decord

    return decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=threads)


class _DecordReader(VideoReader):
    backend = "decord"

    def __init__(self, path: Path, threads: int = 0) -> None:
        super().__init__(path)
        self._reader = _open_decord(path, threads)

    @functools.cached_property
    def info(self) -> VideoInfo:
        count = len(self._reader)
        height, width = self._reader[0].shape[:2] if count else (0, 0)
        return VideoInfo(count, int(height), int(width), float(self._reader.get_avg_fps()))

    def frames(self, indices: Sequence[int] | None = None) -> np.ndarray:
        count = len(self._reader)
        if indices is None:
            if count == 0:
                raise VideoIOError(f"video {self.path} has no frames")
            indices = range(count)
        indices = _as_indices(indices)
        if max(indices) >= count:
            raise self._out_of_range(count, max(indices))
        return self._reader.get_batch(indices).asnumpy()


class _PyAVReader(VideoReader):
    backend = "pyav"

    @functools.cached_property
    def info(self) -> VideoInfo:
        import av

        with av.open(str(self.path)) as container:
            if not container.streams.video:
                raise VideoIOError(f"video {self.path} has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            count = stream.frames
            if not count:
                # Some containers do not record a frame count; count by demuxing (no decoding needed).
                count = sum(1 for packet in container.demux(stream) if packet.size)
            return VideoInfo(
                frames=int(count),
                height=int(stream.codec_context.height),
                width=int(stream.codec_context.width),
                fps=float(rate) if rate else 0.0,
            )

    def frames(self, indices: Sequence[int] | None = None) -> np.ndarray:
        import av

        wanted = None if indices is None else _as_indices(indices)
        keep, last = (None, None) if wanted is None else (set(wanted), max(wanted))
        got: dict[int, np.ndarray] = {}
        decoded = 0
        with av.open(str(self.path)) as container:
            if not container.streams.video:
                raise VideoIOError(f"video {self.path} has no video stream")
            # Sequential decoding, stopped after the last frame asked for.
            for i, frame in enumerate(container.decode(video=0)):
                if last is not None and i > last:
                    break
                decoded = i + 1
                if keep is None or i in keep:
                    got[i] = frame.to_ndarray(format="rgb24")
        if wanted is None:
            if not got:
                raise VideoIOError(f"video {self.path} has no frames")
            return np.stack([got[i] for i in range(decoded)])
        if last >= decoded:
            raise self._out_of_range(decoded, last)
        return np.stack([got[i] for i in wanted])


def _as_indices(indices: Sequence[int]) -> list[int]:
    indices = [int(i) for i in indices]
    if not indices or min(indices) < 0:
        raise ValueError(f"frame indices must be a non-empty list of indices >= 0, got {indices}")
    return indices


def open_video(path: str | os.PathLike, backend: str = "decord", *, decode_threads: int = 0) -> VideoReader:
    """Open ``path`` with one decoder (``"decord"`` or ``"pyav"``); no fallback (see `with_video`).

    Args:
        path: A video file (any container FFmpeg reads).
        backend: An entry of `BACKENDS`.
        decode_threads: decord's decoding threads (0: its default); data loaders that decode in many
            workers at once ask for 1.
    """
    path = Path(path)
    if backend == "decord":
        return _DecordReader(path, decode_threads)
    if backend == "pyav":
        return _PyAVReader(path)
    raise ValueError(f"backend must be 'auto' or one of {list(BACKENDS)}, got {backend!r}")


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"video {path} does not exist")
    if not path.is_file():
        raise VideoIOError(f"video {path} is not a file")


def with_video(
    path: str | os.PathLike,
    use: Callable[[VideoReader], T],
    *,
    backend: str = "auto",
    final: tuple[type[BaseException], ...] = (FrameIndexError,),
    decode_threads: int = 0,
) -> T:
    """``use(reader)`` on the file opened with decord, and again with PyAV where decord fails.

    Args:
        path: A video file.
        use: Reads what it needs from the `VideoReader` (its `VideoReader.info`, some frames).
        backend: ``"auto"`` (decord, then PyAV), ``"decord"`` or ``"pyav"``.
        final: Errors that say something about the video itself (too short, too small): raised at once,
            since the other decoder would say the same.
        decode_threads: See `open_video`.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        UndecodableVideoError: If every decoder failed; it names each one's error.
    """
    path = Path(path)
    _check_readable(path)
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {list(BACKENDS)}, got {backend!r}")
    reasons = []
    for name in BACKENDS if backend == "auto" else (backend,):
        try:
            return use(open_video(path, name, decode_threads=decode_threads))
        except final:
            raise
        except Exception as err:  # decord raises DECORDError/RuntimeError; FFmpeg errors come in many types
            reasons.append(f"{name}: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
            logger.debug("%s could not read %s (%s)", name, path, err)
    raise UndecodableVideoError(path, reasons)


def read_frames(path: str | os.PathLike, indices: Sequence[int]) -> np.ndarray:
    """Decode only the frames at ``indices`` (`with_video`: decord seeks, PyAV decodes up to the last one).

    Returns:
        uint8 RGB ``[len(indices), H, W, 3]``.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        FrameIndexError: If an index is out of range.
        UndecodableVideoError: If neither decoder can read the file.
    """
    indices = _as_indices(indices)  # a bad list is the caller's error, not the file's
    return with_video(path, lambda reader: reader.frames(indices))


def read_video(path: str | os.PathLike) -> np.ndarray:
    """Decode every frame of a video.

    Returns:
        uint8 RGB frames ``[F, H, W, 3]``.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        UndecodableVideoError: If neither decord nor PyAV can decode it.
    """
    return with_video(path, lambda reader: reader.frames())


def frame_count(path: str | os.PathLike) -> int:
    """Number of frames `read_frames` can index: decord's count, or the container's where decord fails."""
    return with_video(path, lambda reader: reader.info.frames)


def video_info(path: str | os.PathLike) -> VideoInfo:
    """Frame count, size and frame rate of a video, read from its headers (frames counted if missing).

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        VideoIOError: If the file is not a readable video.
    """
    path = Path(path)
    _check_readable(path)
    try:
        return _PyAVReader(path).info
    except VideoIOError:
        raise
    except Exception as err:  # PyAV's FFmpeg errors have many types
        raise VideoIOError(f"cannot open video {path}: {err}") from err


# --- writing ----------------------------------------------------------------------------------------------


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


def _encode(file: Path, frames: np.ndarray, fps: float, codec: str, crf: int) -> None:
    import av

    _, height, width, _ = frames.shape
    # The temporary name does not end in .mp4, so the container format is named explicitly.
    with av.open(str(file), mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": str(int(crf)), "preset": "medium"}
        else:
            # MPEG-4 part 2 has no CRF; ~0.3 bit per pixel keeps generated detail visible.
            stream.bit_rate = max(int(0.3 * width * height * fps), 1_000_000)
        for image in frames:
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))  # flush the encoder's delayed frames


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
    try:
        # ``.part``: what a killed writer leaves is recognisably unfinished (the eval stage deletes them).
        with atomic_path(path, suffix=".part") as tmp:
            try:
                _encode(tmp, array, fps, codec, crf)
            except Exception as err:
                raise VideoIOError(f"write_video {path}: encoding with {codec} failed: {err}") from err
    except VideoIOError:
        raise
    except OSError as err:
        raise VideoIOError(f"write_video {path}: cannot write into {folder}: {err.strerror or err}") from err
    num, height, width, _ = array.shape
    logger.debug("wrote %s: %d frames %dx%d at %s fps (%s)", path, num, width, height, fps, codec)
    return path

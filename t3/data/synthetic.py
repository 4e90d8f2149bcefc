"""Procedural moving-shape videos with matching captions: training data without downloads.

Each video shows one shape (square, circle or triangle) of a named colour moving in one of eight directions over
a plain or gradient background, captioned like ``"a red circle moving left on a blue background"``. Everything
is drawn with numpy from ``(seed, index)``, so the same pair always gives the identical video, on any machine.

* :func:`synthetic_video`: one uint8 video and its caption.
* :class:`SyntheticVideoDataset`: map-style pixels + captions (the input a VAE expects).
* :class:`SyntheticLatentDataset`: the same videos encoded with a VAE and a text encoder into training samples
  with the schema of :mod:`t3.data.shards`, each encoded once (memory cache, optional disk cache).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from t3.data.shards import DEFAULT_TEXT_LEN, module_fingerprint
from t3.io import atomic_path, give_umask_mode
from t3.video_io import uint8_to_pixels

__all__ = [
    "COLOURS",
    "DIRECTIONS",
    "SHAPES",
    "SyntheticLatentDataset",
    "SyntheticVideoDataset",
    "synthetic_spec",
    "synthetic_video",
]

logger = logging.getLogger(__name__)

#: Named colours (RGB), far enough apart to tell apart after a lossy VAE.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 60),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 50, 180),
    "orange": (245, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("square", "circle", "triangle")
#: Direction name -> unit step (dx, dy) in image coordinates (y grows downwards).
DIRECTIONS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
    "up and to the left": (-0.7071, -0.7071),
    "up and to the right": (0.7071, -0.7071),
    "down and to the left": (-0.7071, 0.7071),
    "down and to the right": (0.7071, 0.7071),
}


def synthetic_spec(index: int, seed: int = 0) -> dict[str, Any]:
    """The random choices behind video ``index``: shape, colours, direction, background, size, start.

    Returns:
        ``{"shape", "colour", "background", "gradient", "direction", "size", "start", "speed"}`` with size,
        start and speed as fractions of the frame size.
    """
    rng = np.random.default_rng([seed, index])  # independent stream per (seed, index), no global state
    colour = str(rng.choice(list(COLOURS)))
    background = str(rng.choice([c for c in COLOURS if c != colour]))
    direction = str(rng.choice(list(DIRECTIONS)))
    dx, dy = DIRECTIONS[direction]
    size = float(rng.uniform(0.2, 0.35))  # shape diameter / min(H, W)
    speed = float(rng.uniform(0.3, 0.5))  # distance travelled over the clip / frame size
    # Start so the whole path stays inside the frame: centre - speed/2 * direction, with a little jitter.
    start = (
        0.5 - 0.5 * speed * dx + float(rng.uniform(-0.05, 0.05)),
        0.5 - 0.5 * speed * dy + float(rng.uniform(-0.05, 0.05)),
    )
    return {
        "shape": str(rng.choice(SHAPES)),
        "colour": colour,
        "background": background,
        "gradient": bool(rng.random() < 0.5),
        "direction": direction,
        "size": size,
        "start": start,
        "speed": speed,
    }


def _caption(spec: dict[str, Any]) -> str:
    background = f"{spec['background']} gradient" if spec["gradient"] else spec["background"]
    article = "an" if spec["colour"][0] in "aeiou" else "a"
    return (
        f"{article} {spec['colour']} {spec['shape']} moving {spec['direction']} on a {background} background"
    )


def synthetic_video(
    index: int, *, frames: int = 17, height: int = 64, width: int = 64, seed: int = 0
) -> tuple[np.ndarray, str]:
    """Draw video ``index`` of the synthetic set.

    Args:
        index: Video number (any non-negative int).
        frames: Number of frames.
        height: Frame height in pixels.
        width: Frame width in pixels.
        seed: Data-set seed; the same ``(index, seed)`` gives the identical video.

    Returns:
        ``(video, caption)``: uint8 ``[frames, height, width, 3]`` RGB and e.g.
        ``"a red circle moving left on a blue background"``.
    """
    if index < 0 or frames < 1 or height < 1 or width < 1:
        raise ValueError(
            f"synthetic_video: bad arguments index={index} frames={frames} size={height}x{width}"
        )
    spec = synthetic_spec(index, seed)
    colour = np.array(COLOURS[spec["colour"]], dtype=np.float32)
    bg = np.array(COLOURS[spec["background"]], dtype=np.float32)

    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    if spec["gradient"]:
        # Background colour fading to half brightness from left to right.
        shade = 1.0 - 0.5 * xs / max(width - 1, 1)
        background = bg[None, None, :] * shade[..., None]
    else:
        background = np.broadcast_to(bg, (height, width, 3))

    radius = 0.5 * spec["size"] * min(height, width)
    dx, dy = DIRECTIONS[spec["direction"]]
    video = np.empty((frames, height, width, 3), dtype=np.uint8)
    for t in range(frames):
        progress = t / max(frames - 1, 1)
        cx = (spec["start"][0] + spec["speed"] * dx * progress) * width
        cy = (spec["start"][1] + spec["speed"] * dy * progress) * height
        u, v = xs - cx, ys - cy
        if spec["shape"] == "square":
            inside = (np.abs(u) <= radius) & (np.abs(v) <= radius)
        elif spec["shape"] == "circle":
            inside = u * u + v * v <= radius * radius
        else:  # upward-pointing triangle inscribed in the square of side 2 * radius
            inside = (v <= radius) & (v >= -radius) & (np.abs(u) <= (v + radius) / 2)
        frame = np.where(inside[..., None], colour, background)
        video[t] = np.clip(frame + 0.5, 0, 255).astype(np.uint8)
    return video, _caption(spec)


def _to_model_input(video: np.ndarray) -> torch.Tensor:
    """uint8 ``[F, H, W, 3]`` -> float ``[3, F, H, W]`` in ``[-1, 1]`` (the layout of :func:`t3.data.load_clip`)."""
    return uint8_to_pixels(torch.from_numpy(video).permute(3, 0, 1, 2))


class SyntheticVideoDataset(torch.utils.data.Dataset):
    """``num_samples`` synthetic videos as model input.

    Items are ``{"video": float [3, F, H, W] in [-1, 1], "caption": str, "index": int}``.

    Args:
        num_samples: Number of videos.
        frames: Frames per video (``4k + 1`` for the Wan VAE).
        height: Frame height.
        width: Frame width.
        seed: Data-set seed.
        fps: Nominal frame rate, recorded in sample metadata.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        frames: int = 17,
        height: int = 64,
        width: int = 64,
        seed: int = 0,
        fps: float = 16.0,
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.num_samples = num_samples
        self.frames, self.height, self.width = frames, height, width
        self.seed = seed
        self.fps = fps

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} synthetic videos")
        video, caption = synthetic_video(
            index, frames=self.frames, height=self.height, width=self.width, seed=self.seed
        )
        return {"video": _to_model_input(video), "caption": caption, "index": index}


class SyntheticLatentDataset(torch.utils.data.Dataset):
    """Synthetic videos encoded into training samples (schema of :mod:`t3.data.shards`).

    Each sample is encoded once: results stay in memory and, with ``cache_dir``, on disk, keyed by the data
    settings and fingerprints of the VAE and text encoder, so a rerun (or another process) reuses them.

    Args:
        num_samples: Number of samples.
        vae: The Wan VAE (its device and dtype are used for encoding).
        text_encoder: A :class:`~t3.models.TextEncoder` or a :class:`~t3.models.PromptEmbeddingCache`.
        frames: Frames per video (``4k + 1``).
        height: Frame height (a multiple of the model's pixel multiple).
        width: Frame width.
        seed: Data-set seed.
        fps: Nominal frame rate, recorded in metadata.
        cache_dir: Folder for the disk cache; None keeps the cache in memory only.
        tiled: Encode with VAE tiling (not needed at small sizes).
        text_len: Padded text length.
        dtype: dtype of the returned latents and text (None: as encoded).
    """

    def __init__(
        self,
        num_samples: int,
        *,
        vae: torch.nn.Module,
        text_encoder: Any,
        frames: int = 17,
        height: int = 64,
        width: int = 64,
        seed: int = 0,
        fps: float = 16.0,
        cache_dir: str | os.PathLike | None = None,
        tiled: bool = False,
        text_len: int = DEFAULT_TEXT_LEN,
        dtype: torch.dtype | None = None,
    ) -> None:
        from t3.models.text_encoder import PromptEmbeddingCache  # deferred: pulls in transformers

        self.videos = SyntheticVideoDataset(
            num_samples, frames=frames, height=height, width=width, seed=seed, fps=fps
        )
        self.vae = vae
        if isinstance(text_encoder, PromptEmbeddingCache):
            self.text_cache = text_encoder
        else:
            self.text_cache = PromptEmbeddingCache(text_encoder, max_length=text_len)
        self.text_len = self.text_cache.max_length
        self.tiled = tiled
        self.dtype = dtype
        self.encoded = 0  # samples encoded by this object (not served from a cache)
        self._memory: dict[int, dict[str, Any]] = {}
        self.cache_dir: Path | None = None
        if cache_dir is not None:
            settings = json.dumps(
                [
                    seed,
                    frames,
                    height,
                    width,
                    self.text_len,
                    module_fingerprint(vae),
                    self.text_cache.identity,
                ]
            )
            tag = hashlib.sha256(settings.encode()).hexdigest()[:16]
            self.cache_dir = Path(cache_dir) / f"synthetic-{tag}"
            self.cache_dir.mkdir(parents=True, exist_ok=True)

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self._memory.get(index)
        if sample is None:
            sample = self._load(index)
            if sample is None:
                sample = self._encode(index)
                self._store(index, sample)
            self._memory[index] = sample
        out = dict(sample, meta=dict(sample["meta"]))
        if self.dtype is not None:
            out["latents"], out["text"] = out["latents"].to(self.dtype), out["text"].to(self.dtype)
        return out

    @torch.no_grad()
    def _encode(self, index: int) -> dict[str, Any]:
        from t3.models.vae import encode_video  # deferred: diffusers is slow to import

        item = self.videos[index]
        latents = encode_video(self.vae, item["video"][None], tiled=self.tiled)[0].float().cpu()
        text, mask = self.text_cache.get([item["caption"]])
        self.encoded += 1
        videos = self.videos
        meta = {
            "source": f"synthetic:{videos.seed}:{index}",
            "fps": videos.fps,
            "num_frames": videos.frames,
            "height": videos.height,
            "width": videos.width,
            "frame_indices": list(range(videos.frames)),
            "text_len": self.text_len,
        }
        return {
            "__key__": f"{index:09d}",
            "latents": latents,
            "text": text[0],
            "text_mask": mask[0],
            "caption": item["caption"],
            "meta": meta,
        }

    def _file(self, index: int) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / f"{index:09d}.safetensors"

    def _load(self, index: int) -> dict[str, Any] | None:
        file = self._file(index)
        if file is None or not file.is_file():
            return None
        try:
            with safe_open(file, framework="pt") as f:
                extra = json.loads(f.metadata()["sample"])
                latents, text = f.get_tensor("latents"), f.get_tensor("text")
        except Exception as err:  # a corrupt cache entry is re-encoded, not fatal
            logger.warning("ignoring unreadable cache entry %s: %s", file, err)
            return None
        padded = text.new_zeros(self.text_len, text.shape[1])
        padded[: len(text)] = text
        mask = torch.zeros(self.text_len, dtype=torch.bool)
        mask[: len(text)] = True
        return {**extra, "latents": latents, "text": padded, "text_mask": mask}

    def _store(self, index: int, sample: dict[str, Any]) -> None:
        file = self._file(index)
        if file is None:
            return
        text = sample["text"][: int(sample["text_mask"].sum())].contiguous()
        extra = {k: sample[k] for k in ("__key__", "caption", "meta")}
        # Temporary name + rename: concurrent workers and interruptions never leave half-written entries.
        with atomic_path(file) as tmp:
            save_file(
                {"latents": sample["latents"].contiguous(), "text": text},
                tmp,
                metadata={"sample": json.dumps(extra)},
            )
            give_umask_mode(tmp)  # a cache other users' runs may read; safetensors writes owner-only

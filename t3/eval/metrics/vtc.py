"""Video-text consistency: ``vtc_clip`` (CLIP, in t3) and ``vtc_viclip`` (ViCLIP, through VBench's own code).

The T3 paper reports a "VTC" score in [0, 1] without naming the model behind it. t3 defines its own and
names it. These are not the paper's numbers.

``vtc_clip`` is the CLIP image-text cosine similarity averaged over frames, then over videos:

* model: a local CLIP folder (``CLIPModel`` weights, its tokenizer and ``preprocessor_config.json``,
  e.g. a copy of ``openai/clip-vit-large-patch14``), loaded with transformers, never downloaded;
* frames: ``num_frames`` = 8 frames spread evenly over the video, first and last included;
* image preprocessing: CLIP's own, from the folder's ``preprocessor_config.json``, through transformers'
  PIL image processor (shortest edge to 224 bicubic, centre crop 224, CLIP mean and std). It is used
  instead of the torchvision-backed one so the numbers do not depend on whether torchvision is installed;
* text: the prompt, truncated to CLIP's 77 tokens (VBench prompts can be longer; the number of
  truncated prompts is recorded);
* score: ``cos(image_embed, text_embed)`` of the projected embeddings, in [-1, 1] (CLIP values are
  typically 0.2-0.4), without the ``100 * max(cos, 0)`` of torchmetrics' ``CLIPScore``. torchmetrics 1.9's
  ``CLIPScore`` does not work with transformers 5, so the score is computed here directly. Frames
  enter in float32.

``vtc_viclip`` is VBench's ``overall_consistency`` score, computed by VBench's own code from a local
checkout of Vchitect/VBench (``metrics.vtc_viclip.repo``; nothing of VBench is copied into t3, see
`t3.eval.metrics.upstream`) with ViCLIP's weights ``ViClip-InternVid-10M-FLT.pth``
(``metrics.vtc_viclip.weights``) and CLIP's BPE vocabulary ``bpe_simple_vocab_16e6.txt.gz``
(``metrics.vtc_viclip.tokenizer``; default: beside the weights, VBench's cache layout). As
``vbench.overall_consistency.compute_overall_consistency`` does, `ViClipConsistency` builds
``SimpleTokenizer(bpe)`` and ``ViCLIP(tokenizer=..., pretrain=weights)`` (``vbench.third_party.ViCLIP``), then
calls ``vbench.overall_consistency.overall_consistency(model, video_dict, tokenizer, device)`` on the
generated videos with their prompts: 8 frames per video, the middle frame of 8 equal segments (decord),
CLIP's 224-pixel transform, ViCLIP's video embedding against its text embedding of the prompt, cosine
similarity, mean over videos (range [-1, 1]). Written against VBench commit ``VICLIP_WRITTEN_AGAINST``; the
checkout's commit is recorded with every score. VBench's tokenizer module looks for
``$VBENCH_CACHE_DIR/ViCLIP/bpe_simple_vocab_16e6.txt.gz`` when imported and tries to download it if absent:
on an offline machine keep VBench's cache layout and set ``VBENCH_CACHE_DIR``. Without the paths the metric
is skipped; it is never replaced by ``vtc_clip``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchmetrics import MeanMetric

from t3.eval.metrics.base import uniform_indices
from t3.eval.metrics.upstream import checkout_paths, import_from_checkout, upstream_commit
from t3.io import sha256_file

__all__ = [
    "VICLIP_WRITTEN_AGAINST",
    "VTC_CLIP_NAME",
    "VTC_VICLIP_NAME",
    "ClipConsistency",
    "ViClipConsistency",
    "ViClipSettings",
]

logger = logging.getLogger(__name__)

VTC_CLIP_NAME = "vtc_clip"
VTC_VICLIP_NAME = "vtc_viclip"

#: The Vchitect/VBench commit the ViCLIP adapter was written against (entry points and their arguments).
VICLIP_WRITTEN_AGAINST = "45e79ec14e69a2187202c675d2dbce1a71843d53"
#: Files of the checkout the adapter calls into.
_VBENCH_REQUIRED = (
    "vbench/__init__.py",
    "vbench/overall_consistency.py",
    "vbench/third_party/ViCLIP/viclip.py",
    "vbench/third_party/ViCLIP/simple_tokenizer.py",
)
#: CLIP's BPE vocabulary, as VBench names it in its cache.
VICLIP_BPE = "bpe_simple_vocab_16e6.txt.gz"


def _embedding(output: Any) -> torch.Tensor:
    """Projected embeddings from ``get_*_features``: a tensor before transformers 5, ``pooler_output`` from 5 on."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipConsistency:
    """CLIP image-text cosine similarity of videos and their prompts (``vtc_clip``).

    ``score`` gives one video's value; ``mean`` is a torchmetrics ``MeanMetric`` (sum and count states,
    summed across processes) of all scored videos.

    Args:
        path: Local CLIP folder (model weights, tokenizer and ``preprocessor_config.json``).
        num_frames: Frames per video.
        device: Where to run CLIP.

    Raises:
        FileNotFoundError: If the folder lacks ``config.json`` or ``preprocessor_config.json``.
    """

    def __init__(self, path: str | os.PathLike, *, num_frames: int = 8, device: torch.device | str = "cpu"):
        from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

        path = Path(path)
        for name in ("config.json", "preprocessor_config.json"):
            if not (path / name).is_file():
                raise FileNotFoundError(f"vtc_clip: {path} has no {name}; expected a CLIP model folder")
        if num_frames < 1:
            raise ValueError(f"metrics.vtc_clip.num_frames must be >= 1, got {num_frames}")
        self.path = path
        self.num_frames = int(num_frames)
        self.device = torch.device(device)
        self.model = CLIPModel.from_pretrained(path, local_files_only=True, dtype=torch.float32)
        self.model = self.model.to(self.device).eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.processor = CLIPImageProcessorPil.from_pretrained(path, local_files_only=True)
        self.max_tokens = int(self.model.config.text_config.max_position_embeddings)
        self.mean = MeanMetric().to(self.device)
        self.num_truncated = 0
        self._text_cache: dict[str, torch.Tensor] = {}

    def frame_indices(self, num_frames: int) -> list[int]:
        return uniform_indices(num_frames, self.num_frames)

    @torch.no_grad()
    def text_embedding(self, prompt: str) -> torch.Tensor:
        """Unit-norm text embedding ``[D]`` of ``prompt`` (truncated to CLIP's context), cached."""
        if prompt not in self._text_cache:
            # One token past the limit is enough to tell whether truncation drops anything.
            probe = self.tokenizer(prompt, truncation=True, max_length=self.max_tokens + 1)["input_ids"]
            if len(probe) > self.max_tokens:
                self.num_truncated += 1
            tokens = self.tokenizer(
                prompt, truncation=True, max_length=self.max_tokens, padding=True, return_tensors="pt"
            ).to(self.device)
            embed = _embedding(self.model.get_text_features(**tokens))[0]
            self._text_cache[prompt] = embed / embed.norm()
        return self._text_cache[prompt]

    @torch.no_grad()
    def score(self, frames: np.ndarray, prompt: str) -> float:
        """Mean cosine similarity of ``frames`` (uint8 ``[F, H, W, 3]``) with ``prompt``; adds it to `mean`."""
        pixels = self.processor(images=list(frames), return_tensors="pt")["pixel_values"].to(self.device)
        images = _embedding(self.model.get_image_features(pixel_values=pixels))
        images = images / images.norm(dim=-1, keepdim=True)
        value = float((images @ self.text_embedding(prompt)).mean())
        self.mean.update(torch.tensor(value, dtype=torch.float64))
        return value

    def protocol(self) -> dict[str, Any]:
        crop = self.processor.crop_size
        return {
            "model": str(self.path),
            "model_type": type(self.model).__name__,
            "frames_per_video": self.num_frames,
            "frame_sampling": "uniform, first and last included",
            "image_preprocessing": f"CLIPImageProcessorPil from the folder (crop {crop})",
            "max_text_tokens": self.max_tokens,
            "prompts_truncated": self.num_truncated,
            "score": "mean over frames of cos(image, text), then mean over videos; range [-1, 1]",
        }


@dataclass(frozen=True)
class ViClipSettings:
    """``metrics.vtc_viclip``.

    Attributes:
        enabled: Compute ``vtc_viclip``.
        repo: Local checkout of Vchitect/VBench (None: skipped).
        weights: ``ViClip-InternVid-10M-FLT.pth`` (None: skipped).
        tokenizer: ``bpe_simple_vocab_16e6.txt.gz``; None: the file of that name beside ``weights``.
    """

    enabled: bool = True
    repo: str | None = None
    weights: str | None = None
    tokenizer: str | None = None

    def resolve(self) -> tuple[Path, Path, Path] | str:
        """``(checkout, weights, tokenizer)`` if given and present, else the reason to skip; a checkout
        without VBench's files is refused (one line naming the key)."""
        if not self.enabled:
            return f"disabled (metrics.{VTC_VICLIP_NAME}.enabled=false)"
        tokenizer = self.tokenizer
        if tokenizer is None and self.weights:
            tokenizer = str(Path(self.weights).expanduser().parent / VICLIP_BPE)
        found = checkout_paths(
            f"metrics.{VTC_VICLIP_NAME}",
            self.repo,
            _VBENCH_REQUIRED,
            {"weights": self.weights, "tokenizer": tokenizer},
        )
        if isinstance(found, str):
            return found
        root, files = found
        return root, files["weights"], files["tokenizer"]


class ViClipConsistency:
    """VBench's ViCLIP video-text consistency, computed by the upstream code of a local checkout.

    Args:
        repo: The VBench checkout.
        weights: ``ViClip-InternVid-10M-FLT.pth``.
        tokenizer: ``bpe_simple_vocab_16e6.txt.gz``.
        device: Where ViCLIP runs.
    """

    def __init__(
        self, repo: Path, weights: Path, tokenizer: Path, *, device: torch.device | str = "cpu"
    ) -> None:
        self.repo, self.weights, self.tokenizer_path = Path(repo), Path(weights), Path(tokenizer)
        self.device = torch.device(device)
        self.commit = upstream_commit(VTC_VICLIP_NAME, self.repo, VICLIP_WRITTEN_AGAINST)
        modules = import_from_checkout(
            self.repo,
            [
                "vbench.overall_consistency",
                "vbench.third_party.ViCLIP.viclip",
                "vbench.third_party.ViCLIP.simple_tokenizer",
            ],
        )
        self._overall_consistency = modules["vbench.overall_consistency"].overall_consistency
        self.tokenizer = modules["vbench.third_party.ViCLIP.simple_tokenizer"].SimpleTokenizer(
            str(self.tokenizer_path)
        )
        viclip = modules["vbench.third_party.ViCLIP.viclip"].ViCLIP
        self.model = viclip(tokenizer=self.tokenizer, pretrain=str(self.weights)).to(self.device)
        self.weights_sha256 = sha256_file(self.weights)

    def score(self, videos: Sequence[tuple[str, Path, str]]) -> tuple[float, dict[str, float]]:
        """VBench's score of ``(name, mp4 path, prompt)`` videos: the mean and each video's value."""
        video_dict = [{"prompt": prompt, "video_list": [str(path)]} for _, path, prompt in videos]
        mean, per_video = self._overall_consistency(self.model, video_dict, self.tokenizer, self.device)
        names = {str(path): name for name, path, _ in videos}
        return float(mean), {names[r["video_path"]]: float(r["video_results"]) for r in per_video}

    def protocol(self) -> dict[str, Any]:
        return {
            "implementation": f"VBench's own code from {self.repo} (vbench.overall_consistency)",
            "upstream_commit": self.commit,
            "written_against": VICLIP_WRITTEN_AGAINST,
            "weights": str(self.weights),
            "weights_sha256": self.weights_sha256,
            "tokenizer": str(self.tokenizer_path),
            "score": "mean over videos of cos(ViCLIP video, ViCLIP text); 8 middle-of-segment frames; range [-1, 1]",
        }

"""Video-text consistency: ``vtc_clip`` (implemented) and ``vtc_viclip`` (not implemented, always skipped).

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

``vtc_viclip`` would use ViCLIP (InternVid's video CLIP, the model VBench scores overall consistency with). t3
does not reimplement its architecture, so the metric is skipped even when weights are given. It is
never replaced by ``vtc_clip``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchmetrics import MeanMetric

from t3.eval.metrics.base import uniform_indices

__all__ = ["VTC_CLIP_NAME", "VTC_VICLIP_NAME", "VICLIP_SKIP_REASON", "ClipConsistency"]

logger = logging.getLogger(__name__)

VTC_CLIP_NAME = "vtc_clip"
VTC_VICLIP_NAME = "vtc_viclip"
VICLIP_SKIP_REASON = "not implemented faithfully (ViCLIP's architecture is not reproduced in t3), see README"


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

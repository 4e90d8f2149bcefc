"""No-reference video quality: ``vqa_dover``, not implemented, always reported as skipped.

The T3 paper reports a "VQA" score (0-100) without naming the model behind it. t3's name for a quality
score is ``vqa_dover``: DOVER (Wu et al., ICCV 2023), whose published checkpoint fuses a technical branch
(Swin3D-T on DOVER's spatial-temporal fragments) and an aesthetic branch (ConvNeXt-3D-T on
down-sampled frames), each with its own head and its own sampling and normalisation.

t3 does not reimplement those backbones, the fragment sampler or the score fusion, and there is no
installable DOVER package to load the checkpoint with here. An approximation would be a different
metric, so ``vqa_dover`` is reported as skipped with `DOVER_SKIP_REASON`, even when
``metrics.vqa_dover.weights`` is set. Nothing else is reported under its name. Scoring with DOVER means
running the authors' code (github.com/VQAssessment/DOVER) on the generated mp4s.
"""

from __future__ import annotations

__all__ = ["DOVER_SKIP_REASON", "VQA_DOVER_NAME"]

VQA_DOVER_NAME = "vqa_dover"
DOVER_SKIP_REASON = "not implemented faithfully, see README"

"""Evaluation metrics, each named after what it measures and with which model.

========================  ==========================================================  ==============
name                      what                                                        status
========================  ==========================================================  ==============
``fvd_i3d``               FVD, StyleGAN-V I3D, 16 frames squashed to 224 x 224        implemented
``fvd_i3d_crop224``       FVD on 224 x 224 full-resolution tiles of the same frames   implemented
``vtc_clip``              CLIP image-text cosine similarity, 8 frames                 implemented
``vtc_viclip``            ViCLIP video-text similarity                                always skipped
``vqa_dover``             DOVER no-reference quality                                  always skipped
========================  ==========================================================  ==============

None of these is the T3 paper's "VQA" or "VTC", whose models the paper does not name.
"""

from t3.eval.metrics.base import MetricResult, skipped
from t3.eval.metrics.fvd import FVD_NAME, FVD_TILED_NAME, FrechetVideoDistance, I3DFeatures, load_i3d
from t3.eval.metrics.vqa import DOVER_SKIP_REASON, VQA_DOVER_NAME
from t3.eval.metrics.vtc import VICLIP_SKIP_REASON, VTC_CLIP_NAME, VTC_VICLIP_NAME, ClipConsistency

#: Every metric name t3 reports, in the order of ``results.json`` and the Markdown table.
METRIC_NAMES: tuple[str, ...] = (FVD_NAME, FVD_TILED_NAME, VTC_CLIP_NAME, VTC_VICLIP_NAME, VQA_DOVER_NAME)

__all__ = [
    "DOVER_SKIP_REASON",
    "FVD_NAME",
    "FVD_TILED_NAME",
    "METRIC_NAMES",
    "VICLIP_SKIP_REASON",
    "VQA_DOVER_NAME",
    "VTC_CLIP_NAME",
    "VTC_VICLIP_NAME",
    "ClipConsistency",
    "FrechetVideoDistance",
    "I3DFeatures",
    "MetricResult",
    "load_i3d",
    "skipped",
]

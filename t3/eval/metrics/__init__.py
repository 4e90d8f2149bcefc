"""Evaluation metrics, each named after what it measures and with which model.

==========================  ========================================================  =============================
name                        what                                                      computed by
==========================  ========================================================  =============================
``fvd_i3d``                 FVD, StyleGAN-V I3D, 16 frames at 16 fps, 224 x 224      t3
``fvd_i3d_crop224``         FVD on 224 x 224 full-resolution tiles of the same clips  t3
``vtc_clip``                CLIP image-text cosine similarity, 8 frames               t3
``vtc_viclip``              ViCLIP video-text similarity (VBench overall_consistency) VBench's code, local checkout
``vqa_dover``               DOVER fused quality x 100 (0-100)                         DOVER's code, local checkout
``vqa_dover_technical``     DOVER technical quality x 100                             DOVER's code, local checkout
``vqa_dover_aesthetic``     DOVER aesthetic quality x 100                             DOVER's code, local checkout
==========================  ========================================================  =============================

The paper names neither its VQA nor its VTC model; ``vqa_dover`` is on the paper's VQA scale (DOVER's fused
score x 100), and nothing else is reported under a name it does not compute.
"""

from t3.eval.metrics.base import MetricResult, skipped
from t3.eval.metrics.fvd import FVD_NAME, FVD_TILED_NAME, FrechetVideoDistance, I3DFeatures, load_i3d
from t3.eval.metrics.vqa import (
    VQA_DOVER_AESTHETIC_NAME,
    VQA_DOVER_NAME,
    VQA_DOVER_TECHNICAL_NAME,
    DoverQuality,
    DoverSettings,
)
from t3.eval.metrics.vtc import (
    VTC_CLIP_NAME,
    VTC_VICLIP_NAME,
    ClipConsistency,
    ViClipConsistency,
    ViClipSettings,
)

#: Every metric name t3 reports, in the order of ``results.json`` and the Markdown table.
METRIC_NAMES: tuple[str, ...] = (
    FVD_NAME,
    FVD_TILED_NAME,
    VTC_CLIP_NAME,
    VTC_VICLIP_NAME,
    VQA_DOVER_NAME,
    VQA_DOVER_TECHNICAL_NAME,
    VQA_DOVER_AESTHETIC_NAME,
)

__all__ = [
    "FVD_NAME",
    "FVD_TILED_NAME",
    "METRIC_NAMES",
    "VQA_DOVER_AESTHETIC_NAME",
    "VQA_DOVER_NAME",
    "VQA_DOVER_TECHNICAL_NAME",
    "VTC_CLIP_NAME",
    "VTC_VICLIP_NAME",
    "ClipConsistency",
    "DoverQuality",
    "DoverSettings",
    "FrechetVideoDistance",
    "I3DFeatures",
    "MetricResult",
    "ViClipConsistency",
    "ViClipSettings",
    "load_i3d",
    "skipped",
]

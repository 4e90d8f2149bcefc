"""Fine-tuning a T3-transformed Wan DiT with Lightning: module, data, strategies, dry run, export.

``python train.py experiment=t3_4k`` composes ``conf/train.yaml`` and calls `train`; tests call it
directly with configs from ``hydra.compose``. `t3.training` imports Lightning and DeepSpeed but not the
model-independent parts of the library (`t3.attention`, `t3.models`) in reverse.
"""

from __future__ import annotations

from t3.training.checkpoints import find_resume_checkpoint
from t3.training.finetune import build_dit
from t3.training.module import NonFiniteLossError, T3FinetuneModule
from t3.training.train import train

__all__ = ["NonFiniteLossError", "T3FinetuneModule", "build_dit", "find_resume_checkpoint", "train"]

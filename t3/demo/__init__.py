"""The CPU demo (``python train.py``): the T3 story in miniature; README.md, "The CPU demo", says what it does.

* `t3.demo.settings`: the typed ``demo`` node of the training schema (`DemoConfig`) and ``demo.fast``;
* `t3.demo.pipeline`: the stages (dense pretraining, T3 and dense fine-tunes) and `run_demo`, whose
  `main` is the demo experiment's ``entry``;
* `t3.demo.evaluation`: the four models compared at the fine-tune size;
* `t3.demo.metrics`: what is measured on each model;
* `t3.demo.report`: ``results.md``, ``demo.png`` and the latent videos.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from t3.demo.settings import FAST_OVERRIDES, DemoConfig, DemoEvalConfig, DemoPretrainConfig, demo_settings

# `t3.config` imports the settings; the rest imports Lightning and the models, so it loads on first use.
_LAZY = {
    "main": "t3.demo.pipeline",
    "run_demo": "t3.demo.pipeline",
    "pretrain_config": "t3.demo.pipeline",
    "pretrain_key": "t3.demo.pipeline",
    "finetune_config": "t3.demo.pipeline",
    "MODEL_NAMES": "t3.demo.evaluation",
    "evaluate": "t3.demo.evaluation",
    "FD_NAME": "t3.demo.metrics",
    "RandomConv3dFeatures": "t3.demo.metrics",
}

if TYPE_CHECKING:
    from t3.demo.evaluation import MODEL_NAMES, evaluate
    from t3.demo.metrics import FD_NAME, RandomConv3dFeatures
    from t3.demo.pipeline import finetune_config, main, pretrain_config, pretrain_key, run_demo


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 't3.demo' has no attribute {name!r}")


__all__ = [
    "FAST_OVERRIDES",
    "FD_NAME",
    "MODEL_NAMES",
    "DemoConfig",
    "DemoEvalConfig",
    "DemoPretrainConfig",
    "RandomConv3dFeatures",
    "demo_settings",
    "evaluate",
    "finetune_config",
    "main",
    "pretrain_config",
    "pretrain_key",
    "run_demo",
]

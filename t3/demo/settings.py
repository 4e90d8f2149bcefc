"""The CPU demo's own settings: the ``demo`` node of the training schema, and its smoke-run variant.

`DemoConfig` is the type of `t3.config.TrainConfig.demo` (None for every other experiment), so a misspelt
key or a value of the wrong type fails at composition; `demo_settings` checks the ranges and applies
``demo.fast``. This module imports nothing heavy: `t3.config` imports it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

__all__ = ["FAST_OVERRIDES", "DemoConfig", "DemoEvalConfig", "DemoPretrainConfig", "demo_settings"]

#: ``demo.fast=true``: dotted keys replaced for a smoke run of every stage (grids (5, 2, 2) -> (5, 4, 8)).
FAST_OVERRIDES: dict[str, Any] = {
    "data.height": 64,
    "data.width": 128,
    "data.train.num_samples": 4,
    "data.val.num_samples": 4,
    "trainer.max_steps": 3,
    "validation.every_n_steps": 3,
    "validation.num_batches": 1,
    "checkpoint.every_n_steps": 3,
    "demo.pretrain.height": 32,
    "demo.pretrain.width": 32,
    "demo.pretrain.steps": 4,
    "demo.pretrain.num_samples": 4,
    "demo.pretrain.val_samples": 4,
    "demo.pretrain.val_every": 2,
    "demo.eval.sample_steps": 2,
    "demo.eval.num_videos": 1,
    "demo.eval.latency_repeats": 1,
}


@dataclass
class DemoPretrainConfig:
    """Stage 1: dense pretraining at a low resolution (``demo.pretrain``).

    Attributes:
        height: Frame height in pixels.
        width: Frame width in pixels.
        steps: Optimizer steps.
        lr: Peak learning rate (the rest of ``optim`` is shared with the fine-tunes).
        num_samples: Synthetic training videos.
        val_samples: Low-resolution held-out videos (for the pretraining curve only).
        val_every: Validate every this many steps (0: never).
    """

    height: int = 64
    width: int = 64
    steps: int = 800
    lr: float = 1e-3
    num_samples: int = 128
    val_samples: int = 16
    val_every: int = 100


@dataclass
class DemoEvalConfig:
    """Stage 3: the comparison at the fine-tune resolution (``demo.eval``).

    Attributes:
        sample_steps: Euler steps of the generated latents.
        sample_seed: Generated sample ``i`` starts from the noise of seed ``sample_seed + i`` for every model.
        num_videos: Latent-visualisation videos written.
        latency_repeats: Timed forwards per model and size; the median is reported.
        latency_scale: Latency is also measured at ``latency_scale`` times the height and width.
        fd_width: Channels of the random feature network (``2 * fd_width`` features).
        fd_seed: Seed of the random feature network.
    """

    sample_steps: int = 20
    sample_seed: int = 0
    num_videos: int = 3
    latency_repeats: int = 5
    latency_scale: int = 2
    fd_width: int = 32
    fd_seed: int = 0


@dataclass
class DemoConfig:
    """The ``demo`` node of ``conf/experiment/demo.yaml``.

    Attributes:
        fast: Apply `FAST_OVERRIDES` (a smoke run of every stage).
        num_threads: ``torch.set_num_threads`` for the run (restored afterwards); None keeps the default.
        pretrain: Stage-1 settings.
        eval: Stage-3 settings.
    """

    fast: bool = False
    num_threads: int | None = 1
    pretrain: DemoPretrainConfig = field(default_factory=DemoPretrainConfig)
    eval: DemoEvalConfig = field(default_factory=DemoEvalConfig)


#: ``(key, lowest accepted value)`` of every count in `DemoConfig`.
_LOWEST = {
    "pretrain.height": 1,
    "pretrain.width": 1,
    "pretrain.steps": 1,
    "pretrain.num_samples": 1,
    "pretrain.val_samples": 1,
    "pretrain.val_every": 0,
    "eval.sample_steps": 1,
    "eval.num_videos": 0,
    "eval.latency_repeats": 1,
    "eval.latency_scale": 1,
    "eval.fd_width": 1,
}


def demo_settings(cfg: DictConfig) -> tuple[DictConfig, DemoConfig]:
    """The config the demo runs on (``demo.fast`` applied) and its ``demo`` node, checked.

    Args:
        cfg: The composed training config of ``experiment=demo``.

    Returns:
        ``(cfg, demo)``: a copy of ``cfg`` with `FAST_OVERRIDES` applied if ``demo.fast``, and its ``demo``
        node as a `DemoConfig`.

    Raises:
        t3.config.ConfigError: No ``demo`` node, or a count out of range (one line naming the key).
    """
    from t3.config import ConfigError  # t3.config imports this module

    if cfg.get("demo") is None:
        raise ConfigError(
            "demo: the CPU demo needs its settings (experiment=demo, conf/experiment/demo.yaml)"
        )
    cfg = copy.deepcopy(cfg)
    if cfg.demo.fast:
        with open_dict(cfg):
            for key, value in FAST_OVERRIDES.items():
                OmegaConf.update(cfg, key, value, merge=False)
    for key, lowest in _LOWEST.items():
        value = OmegaConf.select(cfg.demo, key)
        if value < lowest:
            raise ConfigError(f"demo.{key}={value!r}: must be >= {lowest}")
    if cfg.demo.pretrain.lr <= 0:
        raise ConfigError(f"demo.pretrain.lr={cfg.demo.pretrain.lr!r}: must be > 0")
    if cfg.demo.num_threads is not None and cfg.demo.num_threads < 1:
        raise ConfigError(
            f"demo.num_threads={cfg.demo.num_threads!r}: must be >= 1, or null (torch's default)"
        )
    demo = OmegaConf.to_object(cfg.demo)
    assert isinstance(demo, DemoConfig)
    return cfg, demo

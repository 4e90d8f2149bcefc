"""Fine-tune a Wan DiT with T3 attention: ``python train.py experiment=t3_4k`` (see conf/experiment/).

A thin Hydra entry point; everything happens in `t3.training.train`. The config is checked first, before
Lightning or any model is even imported: an impossible value is printed as one line (exit status 1).
``dry_run=true`` prints the plan (grid, per-layer windows, MACs, memory, throughput) and exits.
"""

from __future__ import annotations

import time

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from t3.config import ConfigError, register_configs, validate

register_configs()


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Run one training job; returns the final ``train/loss`` (for Hydra sweepers)."""
    try:
        validate(cfg)
        if cfg.get("demo") is not None:  # `python train.py`: the default experiment is the CPU demo
            from t3.demo import run_demo

            run_demo(cfg)
            return None
        from t3.training import train

        metrics, _ = train(cfg)
    except ConfigError as err:
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            raise SystemExit(f"config error: {err}") from None
        from t3.training.checkpoints import ResumeRefusedError

        if isinstance(err, ResumeRefusedError):  # the folder's summary stays that of the run it holds
            raise
        # In a sweep, fail this job only (SystemExit would end the whole sweep) and leave its reason
        # in summary.json for `python -m t3.report`.
        from t3.training.train import write_train_summary

        write_train_summary(cfg, "failed", time.time(), error=f"ConfigError: {err}")
        raise
    return metrics.get("train/loss")


if __name__ == "__main__":
    main()

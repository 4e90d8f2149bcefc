"""Fine-tune a Wan DiT with T3 attention: ``python train.py experiment=t3_4k`` (see conf/experiment/).

A thin Hydra entry point; everything happens in `t3.training.train`. The config is checked first, before
Lightning or any model is even imported: an impossible value is printed as one line (exit status 1).
``dry_run=true`` prints the plan (grid, per-layer windows, MACs, memory, throughput) and exits.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from t3.config import ConfigError, register_configs, validate

register_configs()


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Run one training job; returns the final ``train/loss`` (for Hydra sweepers)."""
    try:
        validate(cfg)
        from t3.training import train

        metrics, _ = train(cfg)
    except ConfigError as err:
        raise SystemExit(f"config error: {err}") from None
    return metrics.get("train/loss")


if __name__ == "__main__":
    main()

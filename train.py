"""Fine-tune a Wan DiT with T3 attention (Lightning + Hydra). Rerunning a command resumes its run.

    python train.py                                    # the CPU demo: the paper's story in miniature
    python train.py experiment=t3_720p model.dit_path=/models/Wan2.1-T2V-1.3B-Diffusers/transformer
        data.train.urls_or_dir=/data/shards/720p       # stage 1; stage 2: experiment=t3_4k or t3_4k_lora
    python train.py experiment=t3_4k dry_run=true      # the plan: grid, windows, MACs, memory; no weights
    python train.py -m experiment=ablation_demo        # a sweep; then: python -m t3.report outputs/sweeps/ablation_demo

Main options:
    experiment=NAME            t3_720p, t3_4k, t3_4k_lora (and _wan22), ablation_*, demo; ~experiment: a plain tiny run
    model=NAME                 wan2.1-t2v-1.3b, wan2.2-ti2v-5b, tiny; model.dit_path, model.init_from
    t3=SCHEDULE                wan21_windows, wan21_4k, dense, ... (conf/t3/)
    data.train.urls_or_dir=P   latent shards (data/prepare.py writes them); data.val.urls_or_dir for val/loss
    trainer=gpu|cpu            trainer.devices, trainer.num_nodes, trainer.max_steps
    strategy=NAME              deepspeed_zero2, deepspeed_zero3, deepspeed_zero3_offload, ddp, fsdp2
    batch.global_size=N        fixed over GPU counts (gradient accumulation absorbs them); batch.micro_size
    finetune.trainable=all|attention|lora, optim.lr=X, logger=csv|wandb
    run_dir=PATH               default outputs/<experiment_name>; resume=false starts over
    dry_run=true               plan only (dry_run_num_gpus=N)

The config is checked before Lightning or any model is imported: an impossible value is one line naming
the key (exit status 1). Then the function the config's ``entry`` names runs: `t3.training.train.main`
(training), or the one an experiment sets (the demo's: `t3.demo.pipeline.main`).
"""

from __future__ import annotations

import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from t3.cli import register_help
from t3.config import ConfigError, entry_function, register_configs, validate

register_configs()
register_help(
    __doc__, "train.py", Path(__file__).parent / "conf",
    ("experiment", "model", "t3", "data", "trainer", "strategy", "logger"),
)  # fmt: skip


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Run one job: the config's ``entry``; returns what it returns (for Hydra sweepers: the final
    ``train/loss`` of a training run)."""
    try:
        validate(cfg)
        return entry_function(cfg.entry)(cfg)
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


if __name__ == "__main__":
    main()

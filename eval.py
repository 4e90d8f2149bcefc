"""Evaluate a T3 (or dense) model: generate benchmark videos, score them, or measure speed.

    python eval.py benchmark=4k_vbench model=wan2.1-t2v-1.3b t3=wan21_windows ckpt=/path/to/dit
    python eval.py ... dry_run=true num_shards=8        # what each shard of an 8-task array would do
    python eval.py ... stage=score metrics.fvd_i3d.weights=/path/i3d_torchscript.pt benchmark.data_root=/data
    python eval.py ... stage=speed generation.height=720 generation.width=1280

See ``conf/eval.yaml`` for every option and ``slurm/eval_array.sbatch`` for the array job.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

import t3.eval


@hydra.main(config_path="conf", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    t3.eval.main(cfg)  # a bad value, file or path: one line naming it, exit status 1


if __name__ == "__main__":
    main()

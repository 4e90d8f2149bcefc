"""Evaluate a T3 (or dense) model: generate benchmark videos, score them, or measure speed.

    python eval.py benchmark=4k_vbench model=wan2.1-t2v-1.3b ckpt=/path/to/dit   # with the ckpt's own schedule
    python eval.py ... dry_run=true num_shards=8        # what each shard of an 8-task array would do
    python eval.py ... stage=score metrics.fvd_i3d.weights=/path/i3d_torchscript.pt benchmark.data_root=/data
    python eval.py ... stage=speed generation.height=720 generation.width=1280
    torchrun --nproc_per_node 8 eval.py ... parallel.sequence_parallel_size=8   # each video on 8 GPUs

Main options:
    stage=generate|score|speed   default generate
    benchmark=NAME               4k_vbench, 4k_world_vision (prompt lists shipped), tiny; benchmark.prompts=FILE
    model=NAME, ckpt=PATH        the DiT (any format t3.models.load_dit reads); model.vae_path, model.text_encoder_path
    t3=SCHEDULE                  default: the one the ckpt's T3 record names (else wan21_windows); dense:
                                 the baseline; differing from the record needs allow_schedule_change=true
    generation.height/width/frames/steps/seeds   default: the authors' 2176x3840x81, 50 steps, seed 0
    shard_index=I num_shards=N   default: $SLURM_ARRAY_TASK_ID / $SLURM_ARRAY_TASK_COUNT
    out_dir=PATH                 default outputs/eval/<benchmark>/<run_name>
    parallel.sequence_parallel_size=S   under torchrun: GPUs per video (an SP group); the world / S groups
                                 split the prompts; default 1 (stage=generate only; score and speed: python)
    speed.macs_only=true         MAC counts only (any size, on a CPU)

See ``conf/eval.yaml`` for every option and ``slurm/eval_array.sbatch`` for the array job. Bad input stops
with one line naming it (``HYDRA_FULL_ERROR=1`` for the traceback).
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

import t3.eval
from t3.cli import register_help

register_help(__doc__, "eval.py", Path(__file__).parent / "conf", ("benchmark", "model", "t3", "metrics"))


@hydra.main(config_path="conf", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    t3.eval.main(cfg)  # a bad value, file or path: one line naming it, exit status 1


if __name__ == "__main__":
    main()

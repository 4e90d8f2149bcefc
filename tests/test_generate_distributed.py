"""Generation on 2 CPU processes (gloo): sequence parallelism and data parallelism over prompts equal one process.

* `t3.generate` with ``sp_group`` (the Python API): sp=2 on a token grid of 45 tokens (23 + 22 per rank,
  padded) with a T3 schedule whose windows pad the grid gives the single-process latents (float32, 1e-5
  relative) on both ranks; only rank 0, the one with a VAE and a text encoder, writes.
* ``torchrun --nproc_per_node 2 eval.py``: with ``parallel.sequence_parallel_size=1`` two groups of one
  rank split the prompts (each video made by one process alone); with 2, one SP group makes the videos
  still missing. Either way each file is written once, by one rank, and the videos and records agree.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from t3.attention import build_schedule
from t3.generate import T2VGenerator, generate
from t3.models import load_dit, load_text_encoder, load_vae
from t3.models.tiny import save_tiny_dit, save_tiny_text_encoder, save_tiny_vae
from t3.parallel import build_parallel_groups
from t3.video_io import read_video

from .conftest import REPO_ROOT
from .test_eval_generate import output_files

pytestmark = pytest.mark.slow

RTOL = 1e-5
# 48x80 pixels, 9 frames: latents [4, 3, 6, 10], token grid (3, 3, 5) = 45 tokens, odd for sp=2.
SIZE = {"height": 48, "width": 80, "frames": 9}
PROMPTS = ["a red cat", "a dog in the city"]
# Whole frames, padded 2x3 windows, padded time windows, dense, padded 3D windows (grid (3, 3, 5)).
SCHEDULE = build_schedule("padded", pieces=[(3, 1, 1), (1, 2, 3), (2, 2, 2), (1, 1, 1), (2, 2, 4)])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _generator(models: Path, *, vae: bool = True, text_encoder: bool = True, **kwargs) -> T2VGenerator:
    return T2VGenerator(
        load_dit(models / "dit"),
        load_vae(models / "vae") if vae else None,
        load_text_encoder(models / "text_encoder") if text_encoder else None,
        spec="tiny",
        schedule=SCHEDULE,
        **kwargs,
    )


def _generate(gen: T2VGenerator, out_dir: Path):
    return generate(
        PROMPTS, generator=gen, **SIZE, steps=3, seed=5, out_dir=out_dir, return_latents=True, progress=False
    )


def _sp_worker(rank: int, world: int, port: int, models: Path, out: Path) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        groups = build_parallel_groups(2)
        with pytest.raises(ValueError, match="sequence parallelism runs a T3-transformed DiT"):
            T2VGenerator(
                load_dit(models / "dit"), None, None, spec="tiny", schedule=None, sp_group=groups.sp_group
            )
        # Rank 1 gets neither a VAE nor a text encoder: rank 0 encodes for it and decodes alone.
        first = groups.sp_rank == 0
        gen = _generator(models, vae=first, text_encoder=first, sp_group=groups.sp_group)
        rows = []  # tokens each block's FFN sees: this rank's shard, padded to 23
        gen.dit.blocks[0].ffn.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[1]))
        results = _generate(gen, out / "sp2")
        assert set(rows) == {23}, rows
        torch.save(
            {
                "latents": torch.stack([r.latents for r in results]),
                "paths": [r.video_path for r in results],
                "frames": [r.frames for r in results],
            },
            out / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def _max_relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).abs().max() / ref.abs().max())


def test_sp2_generation_gives_the_single_process_latents(tmp_path):
    models = tmp_path / "models"
    save_tiny_dit(models / "dit")
    save_tiny_vae(models / "vae")
    save_tiny_text_encoder(models / "text_encoder")
    reference = _generate(_generator(models), tmp_path / "one")
    ref_latents = torch.stack([r.latents for r in reference])

    mp.spawn(_sp_worker, args=(2, _free_port(), models, tmp_path), nprocs=2)

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for rank, got in enumerate(ranks):
        error = _max_relative_error(got["latents"], ref_latents)
        print(f"rank {rank}: latents max |sp2 - one process| / max |one process| = {error:.2e}")  # noqa: T201
        assert error <= RTOL, f"rank {rank}: latents differ by {error:.3e} (relative) from one process"
    assert ranks[1]["paths"] == [None, None] and ranks[1]["frames"] == [None, None]
    assert [p.name for p in ranks[0]["paths"]] == [r.video_path.name for r in reference]
    assert output_files(tmp_path / "sp2") == output_files(tmp_path / "one")


# --- eval.py under torchrun ---------------------------------------------------------------------------------

OVERRIDES = [
    "model=tiny",  # the tiny random DiT, VAE and text encoder, built in memory: nothing on disk
    "benchmark=tiny",
    "benchmark.limit=3",
    "generation.height=48",
    "generation.width=80",
    "generation.frames=9",
    "generation.steps=2",
    "generation.device=cpu",
    "wandb.enabled=false",
]
# How and when a video was made, not what it is: may differ between the runs.
RUN_KEYS = {"timings_s", "created_utc", "sequence_parallel_size", "device"}  # device: names its threads


def _torchrun(out: Path, sp: int) -> str:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
        "eval.py", *OVERRIDES, f"out_dir={out}", f"parallel.sequence_parallel_size={sp}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stderr


def _done_lines(log: str) -> list[tuple[str, str]]:
    """(SP group, video) of every "done" line: one per written video."""
    return re.findall(r"SP group (\d+/\d+) \(rank 0 of \d+\): (video_\S+) done", log)


def test_eval_under_torchrun_writes_each_video_once_as_one_process_would(tmp_path):
    names = [f"video_{i:05d}_seed0" for i in range(3)]
    # Data parallel: two groups of one rank split the prompts; every video is made by one process alone.
    dp2 = tmp_path / "dp2"
    log = _torchrun(dp2, sp=1)
    assert sorted(_done_lines(log)) == [
        ("0/2", f"{names[0]}.mp4"),
        ("0/2", f"{names[2]}.mp4"),
        ("1/2", f"{names[1]}.mp4"),
    ]

    # Sequence parallel: video 0 is already there (made without SP), so the one SP group makes 1 and 2.
    sp2 = tmp_path / "sp2"
    sp2.mkdir()
    for suffix in (".mp4", ".json"):
        shutil.copy(dp2 / f"{names[0]}{suffix}", sp2)
    log = _torchrun(sp2, sp=2)
    assert sorted(_done_lines(log)) == [("0/1", f"{names[1]}.mp4"), ("0/1", f"{names[2]}.mp4")]

    assert (
        output_files(sp2)
        == output_files(dp2)
        == sorted([f"{n}.mp4" for n in names] + [f"{n}.json" for n in names])
    )
    for name in names:
        record, ref = (json.loads((d / f"{name}.json").read_text()) for d in (sp2, dp2))
        assert (record["sequence_parallel_size"], ref["sequence_parallel_size"]) == (
            1 if name == names[0] else 2,
            1,
        )
        assert {k: v for k, v in record.items() if k not in RUN_KEYS} == {
            k: v for k, v in ref.items() if k not in RUN_KEYS
        }
        diff = np.abs(read_video(sp2 / f"{name}.mp4").astype(int) - read_video(dp2 / f"{name}.mp4"))
        assert diff.max() <= 1, f"{name}: frames differ by {diff.max()}"

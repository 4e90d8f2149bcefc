"""Two CPU processes (gloo) train the tiny model like one process with the same global batch.

Each strategy runs ``torchrun --standalone --nproc_per_node 2 train.py ...`` (the real entry point) with
global batch 4 = micro-batch 1 x 2 processes x 2 accumulation steps; the reference is one in-process run
with micro-batch 2 x 2 accumulation steps. The samples, noise levels and noise of every step are the same
in both (they are indexed by stream position), so per-step losses, gradient norms, the validation loss and
the exported weights must agree up to float reduction order. The same holds with sequence parallelism
(``parallel.sequence_parallel_size=2``: the two ranks of an SP group share each sample), with 2 and 4
processes, under DDP, DeepSpeed ZeRO-2 and ZeRO-3 and FSDP2, and across a resume.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from t3.training import train

from .conftest import REPO_ROOT
from .test_configs import compose_train
from .test_train_run import TINY, _one_thread, read_metrics  # noqa: F401 (autouse fixture)

pytestmark = pytest.mark.slow

COMMON = [
    "~experiment",  # the plain tiny run, not the default demo
    *TINY,
    "trainer.max_steps=4",
    "batch.global_size=4",
    "optim.lr=1e-3",
    "validation.every_n_steps=2",
    "validation.num_batches=1",
    "checkpoint.every_n_steps=2",
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    """One process, micro-batch 2: ``(run_dir, cache_dir)``; also encodes the shared synthetic data."""
    root = tmp_path_factory.mktemp("reference")
    cache = tmp_path_factory.mktemp("t3_cache")
    cfg = compose_train(
        *COMMON,
        "batch.micro_size=2",
        "validation.num_batches=1",
        f"paths.cache_dir={cache}",
        f"run_dir={root / 'run'}",
        root=root,
    )
    train(cfg)
    return Path(cfg.run_dir), cache


def torchrun(
    run_dir: Path, cache: Path, *overrides: str, nproc: int = 2, check: bool = True
) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
        str(REPO_ROOT / "train.py"),
        *COMMON,
        "batch.micro_size=1",
        f"trainer.devices={nproc}",
        f"paths.root_dir={run_dir.parent}",
        f"paths.cache_dir={cache}",
        f"run_dir={run_dir}",
        *overrides,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=run_dir.parent, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def assert_same_training(reference_dir: Path, run_dir: Path, rtol: float) -> dict[str, float]:
    from t3.models import load_dit

    ref, got = read_metrics(reference_dir), read_metrics(run_dir)
    worst = {}
    for key in ("train/loss", "train/grad_norm", "val/loss"):
        assert sorted(got[key]) == sorted(ref[key]), key
        for step, value in ref[key].items():
            assert got[key][step] == pytest.approx(value, rel=rtol), (key, step)
        worst[key] = max(abs(got[key][s] / v - 1) for s, v in ref[key].items())
    a = load_dit(reference_dir / "export" / "diffusers").state_dict()
    b = load_dit(run_dir / "export" / "diffusers").state_dict()
    worst["weights"] = max(float((a[k] - b[k]).abs().max()) for k in a)
    # Adam normalises each update to about lr (1e-3) per element, so where a gradient is almost zero a
    # 1e-7 difference in it can move a weight differently by a sizeable share of lr: allow 0.1 lr.
    assert worst["weights"] < 1e-4
    return worst


@pytest.mark.parametrize("strategy", ["ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp2"])
def test_two_processes_match_one(strategy, reference, tmp_path):
    ref_dir, cache = reference
    run_dir = tmp_path / strategy
    torchrun(run_dir, cache, f"strategy={strategy}")
    worst = assert_same_training(ref_dir, run_dir, rtol=1e-5)
    print(f"{strategy}: largest relative difference to one process {worst}")
    # The runs trained: the weights moved away from the random initialisation.
    from t3.models import load_dit
    from t3.models.tiny import tiny_dit

    moved = load_dit(run_dir / "export" / "diffusers").state_dict()
    init = tiny_dit(seed=0).state_dict()
    assert max(float((moved[k] - init[k]).abs().max()) for k in init) > 1e-3


@pytest.mark.parametrize("strategy", ["deepspeed_zero2", "fsdp2"])
def test_sharded_resume_matches_uninterrupted(strategy, reference, tmp_path):
    ref_dir, cache = reference
    run_dir = tmp_path / "resumed"
    every_step = "checkpoint.every_n_steps=1"
    torchrun(run_dir, cache, f"strategy={strategy}", "trainer.max_steps=2", "export.formats=[]", every_step)
    newest = run_dir / "checkpoints" / "last.ckpt"
    assert newest.is_symlink() and newest.resolve().is_dir()  # a sharded checkpoint folder
    # One byte flipped in a file rank 1 wrote: its checksum (one per file of the folder) catches it, and the
    # run falls back to the checkpoint of step 1.
    files = json.loads((newest.resolve().parent / (newest.resolve().name + ".sha256.json")).read_text())[
        "files"
    ]
    rank1 = next(name for name in sorted(files) if "rank_1" in name or "__1_" in name)
    data = bytearray((run_dir / "checkpoints" / rank1).read_bytes())
    data[len(data) // 2] ^= 0x01
    (run_dir / "checkpoints" / rank1).write_bytes(bytes(data))
    torchrun(run_dir, cache, f"strategy={strategy}", every_step)  # continues from step 1 to 4
    with open(run_dir / "csv" / "version_1" / "metrics.csv") as f:  # the second start resumed, not restarted
        assert {int(r["step"]) for r in csv.DictReader(f) if r["train/loss"]} == {1, 2, 3}
    assert (run_dir / "checkpoints" / "damaged" / "step=0000002.ckpt").is_dir()
    straight = tmp_path / "straight"
    torchrun(straight, cache, f"strategy={strategy}")
    a, b = read_metrics(straight), read_metrics(run_dir)
    assert a["train/loss"] == b["train/loss"] and sorted(a["train/loss"]) == [0, 1, 2, 3]
    assert torch.equal(
        torch.tensor(list(a["train/grad_norm"].values())), torch.tensor(list(b["train/grad_norm"].values()))
    )


NAN_SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
import torch
import torch.distributed as dist
from tests.test_configs import compose_train
from tests.test_train_run import _NaNAt
from t3.training import train

guard = _NaNAt({{2, 5}})  # step 1's first and step 2's last micro-batch
cfg = compose_train(*{overrides!r}, root={root!r})
train(cfg, callbacks=[guard])
before, after = guard.snapshots[5]
assert all(torch.equal(before[k], after[k]) for k in before), "the non-finite step moved the weights"
print("rank", dist.get_rank(), "ok")
"""


def test_deepspeed_skips_nonfinite_steps(reference, tmp_path):
    _, cache = reference
    overrides = [
        *COMMON,
        "batch.micro_size=1",
        "trainer.devices=2",
        "strategy=deepspeed_zero2",
        "validation.every_n_steps=0",
        "export.formats=[]",
        f"paths.cache_dir={cache}",
        f"run_dir={tmp_path / 'run'}",
    ]
    script = tmp_path / "nan_run.py"
    script.write_text(NAN_SCRIPT.format(repo=str(REPO_ROOT), overrides=overrides, root=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0 and proc.stdout.count(" ok") == 2, proc.stdout[-3000:] + proc.stderr[-5000:]
    logged = read_metrics(tmp_path / "run")
    assert logged["train/num_skipped_nonfinite"] == {0: 0.0, 1: 1.0, 2: 2.0, 3: 2.0}
    # DeepSpeed saw a non-finite gradient norm in steps 1 and 2 and dropped them.
    assert [logged["train/grad_norm"][s] == float("inf") for s in range(4)] == [False, True, True, False]


# --- sequence parallelism (t3.parallel): the ranks of an SP group share each sample ---------------------------
# The tiny model's grid is 5 x 2 x 2 tokens; the default schedule's last layer (windows [3, 17, 40]: plan
# (2, 1, 1)) pads 5 frames to 6; align=frames cuts 3 + 2 frames: uneven shards. Global batch 4 is 1 x 1
# data-parallel x 4 accumulation with 2 processes, 1 x 2 x 2 with 4. Validation reads num_batches per
# data-parallel rank: the reference's 2 held-out samples take 2 batches with one SP group, 1 with two.


def sequence_parallel(nproc: int, *overrides: str) -> list[str]:
    return [
        "parallel.sequence_parallel_size=2",
        f"validation.num_batches={4 // nproc}",
        *overrides,
    ]


@pytest.mark.parametrize(
    ("nproc", "strategy", "align"),
    [
        (2, "ddp", "tokens"),
        (4, "ddp", "frames"),
        (4, "deepspeed_zero2", "tokens"),
        (2, "deepspeed_zero3", "tokens"),  # parameters gathered per layer inside the SP forward
        (2, "fsdp2", "tokens"),
    ],
)
def test_sequence_parallel_matches_one_process(nproc, strategy, align, reference, tmp_path):
    ref_dir, cache = reference
    run_dir = tmp_path / strategy
    torchrun(
        run_dir,
        cache,
        *sequence_parallel(nproc, f"strategy={strategy}", f"parallel.align={align}"),
        nproc=nproc,
    )
    worst = assert_same_training(ref_dir, run_dir, rtol=1e-5)
    print(
        f"sp=2 x {nproc // 2} data-parallel, {strategy}: largest relative difference to one process {worst}"
    )


def test_sequence_parallel_resume_continues_the_run(reference, tmp_path):
    """sp=2 under DeepSpeed ZeRO-2 (per-rank checkpoint shards), interrupted after step 2: the resumed run's
    losses, gradient norms, validation loss and export are those of one process."""
    ref_dir, cache = reference
    run_dir = tmp_path / "resumed"
    overrides = sequence_parallel(2, "strategy=deepspeed_zero2")
    torchrun(run_dir, cache, *overrides, "trainer.max_steps=2", "export.formats=[]")
    assert (run_dir / "checkpoints" / "last.ckpt").resolve().is_dir()  # DeepSpeed's per-rank shards
    torchrun(run_dir, cache, *overrides)  # continues from step 2 to 4
    with open(run_dir / "csv" / "version_1" / "metrics.csv") as f:  # the second start resumed
        assert {int(r["step"]) for r in csv.DictReader(f) if r["train/loss"]} == {2, 3}
    worst = assert_same_training(ref_dir, run_dir, rtol=1e-5)
    print(f"sp=2, deepspeed_zero2, resumed: largest relative difference to one process {worst}")

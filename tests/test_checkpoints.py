"""Checkpoint checksums, the choice of the checkpoint to resume, the training digest, starting over."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from t3.config import ConfigError
from t3.training.checkpoints import (
    checksum_file,
    find_resume_checkpoint,
    move_run_aside,
    training_digest,
    verify_checkpoint,
    write_checksums,
)

from .test_configs import compose_train


def _flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _folder_checkpoint(root: Path, name: str, step: int) -> Path:
    """A DeepSpeed-like checkpoint folder: several files, one level down."""
    folder = root / "checkpoints" / name
    (folder / "checkpoint").mkdir(parents=True)
    for rank in range(2):
        (folder / "checkpoint" / f"zero_rank_{rank}_optim_states.pt").write_bytes(os.urandom(4096))
    (folder / "latest").write_text("checkpoint")
    write_checksums(folder, step=step, digest="abc", settings={"seed": 1})
    return folder


def test_checksums_catch_flipped_bytes_truncation_and_missing_or_extra_files(tmp_path):
    folder = _folder_checkpoint(tmp_path, "step=0000002.ckpt", 2)
    record = json.loads(checksum_file(folder).read_text())
    assert record["step"] == 2 and len(record["files"]) == 3
    assert verify_checkpoint(folder) == (record, None)

    shard = folder / "checkpoint" / "zero_rank_1_optim_states.pt"
    _flip_byte(shard)
    _, problem = verify_checkpoint(folder)
    assert "zero_rank_1_optim_states.pt has sha256" in problem
    _flip_byte(shard)  # back
    shard.write_bytes(shard.read_bytes()[:100])
    assert "zero_rank_1_optim_states.pt" in verify_checkpoint(folder)[1]
    shard.unlink()
    assert "is missing" in verify_checkpoint(folder)[1]

    single = tmp_path / "step=0000003.ckpt"
    single.write_bytes(b"weights" * 100)
    assert "did not finish" in verify_checkpoint(single)[1]
    write_checksums(single, step=3, digest="abc")
    assert verify_checkpoint(single)[1] is None
    (tmp_path / "step=0000003.ckpt").write_bytes(b"weights" * 50)
    assert "truncated or corrupted" in verify_checkpoint(single)[1]


def test_resume_takes_the_newest_intact_checkpoint_and_moves_damaged_ones_aside(tmp_path, caplog):
    for step in (1, 2, 3):
        _folder_checkpoint(tmp_path, f"step={step:07d}.ckpt", step)
    newest = tmp_path / "checkpoints" / "step=0000003.ckpt"
    _flip_byte(newest / "latest", 0)
    unfinished = tmp_path / "checkpoints" / "step=0000004.ckpt"
    unfinished.mkdir()  # a save killed before its checksum file
    assert find_resume_checkpoint(tmp_path, "abc") == str(tmp_path / "checkpoints" / "step=0000002.ckpt")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(
        "step=0000003.ckpt is not usable: step=0000003.ckpt/latest has sha256" in w for w in warnings
    ), warnings
    assert any("step=0000004.ckpt is not usable: no checksum file" in w for w in warnings), warnings
    damaged = sorted(p.name for p in (tmp_path / "checkpoints" / "damaged").iterdir())
    assert damaged == [
        "step=0000003.ckpt",
        "step=0000003.ckpt.sha256.json",
        "step=0000004.ckpt",
    ]
    # The next rerun finds the intact one at once.
    caplog.clear()
    assert find_resume_checkpoint(tmp_path, "abc").endswith("step=0000002.ckpt") and not caplog.records


def test_no_intact_checkpoint_is_refused_but_only_unfinished_saves_start_over(tmp_path):
    folder = _folder_checkpoint(tmp_path, "step=0000001.ckpt", 1)
    _flip_byte(folder / "latest", 0)
    with pytest.raises(
        ConfigError,
        match=r"no intact checkpoint to resume .*step=0000001.ckpt: step=0000001.ckpt/latest has sha256.*resume=false",
    ):
        find_resume_checkpoint(tmp_path, "abc")
    assert folder.exists()  # nothing is moved when the run cannot go on

    other = tmp_path / "other"
    (other / "checkpoints" / "step=0000001.ckpt").mkdir(parents=True)
    assert find_resume_checkpoint(other, "abc") is None  # a first save killed midway: start over
    assert (other / "checkpoints" / "damaged" / "step=0000001.ckpt").is_dir()
    assert find_resume_checkpoint(tmp_path / "empty", "abc") is None


def test_a_checkpoint_of_other_settings_is_refused_naming_them(tmp_path):
    _folder_checkpoint(tmp_path, "step=0000001.ckpt", 1)  # settings {"seed": 1}, digest "abc"
    with pytest.raises(ConfigError) as info:
        find_resume_checkpoint(tmp_path, "def", settings={"seed": 2})
    message = str(info.value)
    assert "\n" not in message and "seed: 1 -> 2" in message and "resume_changed_config=true" in message
    path = find_resume_checkpoint(tmp_path, "def", settings={"seed": 2}, allow_changed_config=True)
    assert path.endswith("step=0000001.ckpt")


def test_training_digest_covers_what_is_trained_and_nothing_else():
    base, _ = training_digest(compose_train())
    same = [
        "run_dir=/elsewhere",
        "paths.cache_dir=/scratch/cache",
        "trainer.log_every_n_steps=10",
        "trainer.max_steps=50",  # a longer run with a constant learning rate continues the same one
        "checkpoint.keep=5",
        "validation.every_n_steps=3",
        "logger.wandb=true",
        "export.formats=[wan]",
        "model.dit_path=/models/other_copy",
        "data.max_skipped_fraction=0.5",
        "trainer.devices=2",  # a requeued job may get another GPU count: the global batch is fixed
        "data.num_workers=3",
    ]
    for override in same:
        assert training_digest(compose_train(override))[0] == base, override
    changed = ["optim.lr=1e-4", "seed=1", "t3=dense", "batch.global_size=8", "finetune.trainable=attention"]
    for override in changed:
        assert training_digest(compose_train(override))[0] != base, override
    # With a cosine schedule the run's length decides the learning rate of every step.
    cosine = training_digest(compose_train("optim.schedule=cosine"))[0]
    assert training_digest(compose_train("optim.schedule=cosine", "trainer.max_steps=50"))[0] != cosine


def test_move_run_aside_keeps_everything_of_the_previous_run(tmp_path):
    for name in ("checkpoints/step=0000001.ckpt", "csv/version_0/metrics.csv", "export/diffusers/x"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("old")
    (tmp_path / "summary.json").write_text("{}")
    (tmp_path / "hpc_ckpt_1.ckpt").write_text("old")
    (tmp_path / ".hydra").mkdir()
    (tmp_path / "train.log").write_text("the starting job's log")
    moved = move_run_aside(tmp_path)
    assert moved.parent == tmp_path / "previous_runs"
    assert sorted(p.name for p in moved.iterdir()) == [
        "checkpoints",
        "csv",
        "export",
        "hpc_ckpt_1.ckpt",
        "summary.json",
    ]
    assert (moved / "checkpoints" / "step=0000001.ckpt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hydra", "previous_runs", "train.log"]
    assert move_run_aside(tmp_path) is None  # nothing left to move

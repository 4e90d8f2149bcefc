"""Benchmark prompt lists, sharding, SLURM array variables and the dry run of ``eval.py``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from t3.eval import run
from t3.eval.prompts import describe_shards, load_prompts, resolve_shard, shard_range

from .conftest import PROMPT_LISTS, REPO_ROOT
from .test_eval_generate import compose_eval

VBENCH = PROMPT_LISTS / "4k_vbench.json"
EIGHT_SHARDS = [f"shard {i}/8: 15 prompts ({15 * i}..{15 * i + 14})" for i in range(8)]


def test_the_authors_prompt_lists_load():
    vbench = load_prompts(VBENCH)
    assert len(vbench) == 120 and [e.index for e in vbench] == list(range(120))
    assert all(e.data_file.startswith("vids/") and e.data_file.endswith(".mp4") for e in vbench)
    assert vbench[0].prompt.startswith("A leopard is resting near a tree trunk")
    world = load_prompts(PROMPT_LISTS / "4k_world_vision.json")
    assert len(world) == 100 and all(e.data_file == "" for e in world)
    assert len(load_prompts(VBENCH, limit=5)) == 5


@pytest.mark.parametrize("num_items, num_shards", [(120, 8), (5, 2), (7, 3), (2, 4), (0, 3), (1, 1)])
def test_shards_are_contiguous_balanced_and_cover_every_prompt_once(num_items, num_shards):
    parts = [shard_range(num_items, i, num_shards) for i in range(num_shards)]
    assert [i for part in parts for i in part] == list(range(num_items))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_dry_run_lists_each_shard(capsys):
    entries = load_prompts(VBENCH)
    assert describe_shards(entries, 8) == EIGHT_SHARDS
    assert describe_shards(entries[:5], 2) == ["shard 0/2: 3 prompts (0..2)", "shard 1/2: 2 prompts (3..4)"]
    assert describe_shards(entries[:1], 2)[1] == "shard 1/2: 0 prompts (none)"
    lines = run(compose_eval("dry_run=true", "num_shards=8", f"benchmark.prompts={VBENCH}"))
    assert lines == EIGHT_SHARDS and capsys.readouterr().out.splitlines() == EIGHT_SHARDS


@pytest.mark.parametrize(
    "benchmark, file", [("4k_vbench", "4k_vbench.json"), ("4k_world_vision", "4k_world_vision.json"),
                        ("tiny", "4k_vbench.json")]
)  # fmt: skip
def test_benchmarks_read_the_shipped_prompt_lists_from_any_folder(benchmark, file, tmp_path, monkeypatch):
    monkeypatch.delenv("T3_PROMPTS_DIR", raising=False)
    monkeypatch.chdir(tmp_path)  # a clean clone run from elsewhere: nothing beside the repository
    shipped = REPO_ROOT / "t3" / "eval" / "prompt_lists" / file
    assert shipped.is_file()
    assert compose_eval(f"benchmark={benchmark}").benchmark.prompts == str(shipped)
    # Users' own copies: a folder of files with the same names.
    monkeypatch.setenv("T3_PROMPTS_DIR", str(tmp_path / "mine"))
    assert compose_eval(f"benchmark={benchmark}").benchmark.prompts == str(tmp_path / "mine" / file)


def test_nothing_in_the_repository_reads_files_beside_it():
    """A clean clone has nothing beside it: no config, code, test or doc points at ../shared."""
    pattern = re.compile(r"\.\./shared|shared/fixtures|SHARED_FIXTURES")
    offenders = []
    for folder in ("conf", "t3", "slurm", "tests", "data", "benchmarks"):
        for path in (REPO_ROOT / folder).rglob("*"):
            if path.is_file() and path.suffix in (".py", ".yaml", ".md", ".sbatch", ".example", ".sh"):
                if path.name != Path(__file__).name and pattern.search(path.read_text(errors="ignore")):
                    offenders.append(str(path.relative_to(REPO_ROOT)))
    for name in ("README.md", "train.py", "eval.py"):
        if pattern.search((REPO_ROOT / name).read_text()):
            offenders.append(name)
    assert offenders == []


def test_shard_comes_from_slurm_array_variables():
    env = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "8"}
    assert resolve_shard(None, None, env) == (3, 8)
    assert resolve_shard(1, None, env) == (1, 8)  # explicit values win
    assert resolve_shard(None, None, {}) == (0, 1)
    with pytest.raises(
        ValueError,
        match=r"shard_index 8 is out of range for num_shards 8: expected "
        r"0 <= shard_index <= 7 \(from shard_index=SLURM_ARRAY_TASK_ID, num_shards=SLURM_ARRAY_TASK_COUNT\)",
    ):
        resolve_shard(None, None, {"SLURM_ARRAY_TASK_ID": "8", "SLURM_ARRAY_TASK_COUNT": "8"})
    with pytest.raises(ValueError, match=r"shard_index 2 is out of range for num_shards 2"):
        resolve_shard(2, 2, {})
    with pytest.raises(ValueError, match=r"environment variable SLURM_ARRAY_TASK_ID='x' is not an integer"):
        resolve_shard(None, None, {"SLURM_ARRAY_TASK_ID": "x"})


def test_eval_cli_dry_run_prints_eight_shards_of_fifteen_from_slurm_variables(tmp_path):
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "8"}
    cmd = [sys.executable, "eval.py", "benchmark=4k_vbench", f"benchmark.prompts={VBENCH}", "dry_run=true",
           f"out_dir={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'hydra'}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == EIGHT_SHARDS
    assert not (tmp_path / "out").exists()  # nothing generated, nothing loaded


@pytest.mark.parametrize(
    "content, message",
    [
        ("{}", r"expected a non-empty JSON list"),
        ("[1]", r"entry 0 is a int, expected an object"),
        ('[{"data_file": "a.mp4"}]', r"entry 0 has no non-empty string 'prompt_en'"),
        ('[{"prompt_en": "x", "data_file": 3}]', r"entry 0 'data_file' must be a string, got 3"),
        ("[", r"not valid JSON"),
    ],
)
def test_malformed_prompt_lists_are_rejected_naming_the_entry(tmp_path, content, message):
    path = tmp_path / "prompts.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=rf"prompt list {path}: {message}"):
        load_prompts(path)


def test_prompt_limit_must_be_positive(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps([{"prompt_en": "a cat", "data_file": ""}]))
    with pytest.raises(ValueError, match=r"benchmark.limit must be a positive int or null, got 0"):
        load_prompts(path, limit=0)

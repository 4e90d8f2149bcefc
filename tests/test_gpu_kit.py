"""The GPU validation kit (benchmarks/gpu/): its CPU mode, budgets, results files and wheel list."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

from .conftest import REPO_ROOT

CHECK_NAMES = [
    "environment", "pytest_gpu", "attention", "dit", "memory", "lightning", "sequence_parallel", "dit_wan22",
]  # fmt: skip


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )


def _kit(out, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """``bash benchmarks/gpu/run.sh OUT --cpu --tiny ...`` with this interpreter and no wheels to install."""
    env = dict(os.environ, PYTHON=sys.executable, T3_KIT_WHEELS=str(out) + "-no-wheels")
    env.pop("OUT", None)
    command = ["bash", str(REPO_ROOT / "benchmarks/gpu/run.sh"), str(out), "--cpu", "--tiny", *args]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def _final_status(records: list[dict]) -> dict[str, dict]:
    return {r["check"]: r for r in records if r["kind"] == "status" and r["status"] != "running"}


def test_training_path_imports_without_packages_absent_on_the_gpu_machine():
    # The kit's Lightning check runs train.py on a machine without deepspeed, webdataset, decord,
    # av, wandb, submitit, ftfy: the synthetic-data training path must not import them.
    result = _python(
        "from benchmarks.gpu.machine import block_absent_imports\n"
        "block_absent_imports()\n"
        "from hydra.utils import get_method\n"
        "get_method('t3.data.factories.synthetic_latents')\n"
        "import t3.training.train, t3.training.module, t3.training.callbacks, t3.training.strategies\n"
        "import t3.training.export, t3.training.dry_run, t3.launch\n"
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_dit_path_imports_without_packages_absent_on_the_gpu_machine():
    # The kit's DiT and memory checks cast a random DiT as generation does (t3.generate), on a machine
    # without PyAV: only writing or reading mp4 files may need it.
    result = _python(
        "from benchmarks.gpu.machine import block_absent_imports\n"
        "block_absent_imports()\n"
        "import t3.generate, t3.video_io, t3.eval.speed_stage\n"
    )
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.slow
def test_cpu_tiny_run_writes_every_check_result_and_the_summary(tmp_path):
    out = tmp_path / "out"
    result = _kit(out, "--total-budget", "3600")  # a loaded CI machine must not skip checks
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = _records(out)
    assert len({r["run"] for r in records}) == 1
    run = records[0]
    assert (
        run["kind"] == "run" and run["device"] == "cpu" and run["tiny"] and list(run["checks"]) == CHECK_NAMES
    )
    status = _final_status(records)
    assert {name: s["status"] for name, s in status.items()} == dict.fromkeys(CHECK_NAMES, "ok")
    for name in CHECK_NAMES:
        assert status[name]["elapsed_s"] <= status[name]["budget_s"]
    rows = [r for r in records if r["kind"] == "row"]
    assert {r["check"] for r in rows} == set(CHECK_NAMES)
    env = next(r for r in rows if r["check"] == "environment")
    assert env["torch"] == torch.__version__ and env["device"].startswith("CPU")

    for attention_pass in ("forward", "forward+backward"):
        attention = [r for r in rows if r["table"] == f"T3 vs dense, {attention_pass}"]
        assert [r["layer"] for r in attention] == [0, 1, 2, 3, 4, "period"]
        assert all(r["speed-up"] > 0 and r["efficiency"] > 0 and r["MAC ratio"] >= 1 for r in attention)
    dit = [r for r in rows if r["table"] == "DiT speed-up: measured vs MAC ratio"]
    assert [r["check"] for r in dit] == ["dit", "dit", "dit_wan22"] and all(
        r["measured speed-up"] for r in dit
    )
    memory = [r for r in rows if r["table"] == "training step, one period of blocks"]
    assert [(r["tokens"], r["activation offload"]) for r in memory] == [
        (144, False),
        (144, True),
        (576, False),
        (576, True),  # the quarter size, then "4K" (test-sized)
    ]
    assert all(0 < r["measured / predicted"] < 10 for r in memory)
    (train,) = [r for r in rows if r["check"] == "lightning"]
    assert train["status"] == "completed" and math.isfinite(train["final loss"])
    (sp,) = [r for r in rows if r["check"] == "sequence_parallel"]
    assert (
        sp["dtype"] == "float32"
        and sp["max |SP - plain| / max |plain|"] <= 1e-4
        and sp["SP / plain time"] > 0
    )

    summary = (out / "summary.md").read_text()
    assert "finished after" in summary and summary.count("| ok |") == len(CHECK_NAMES)
    assert summary in result.stdout  # printed at the end, for the device tool's output tail
    assert "===== lightning" in (out / "kit.log").read_text()


@pytest.mark.slow
def test_a_check_over_its_budget_is_stopped_and_recorded(tmp_path):
    out = tmp_path / "out"
    begin = time.time()
    result = _kit(out, "--only", "dit", "--budget", "dit=1")
    assert result.returncode == 1, result.stdout[-3000:]
    status = _final_status(_records(out))
    assert status["environment"]["status"] == "ok"
    assert status["dit"]["status"] == "timeout" and status["dit"]["budget_s"] == 1
    assert status["dit"]["elapsed_s"] < 1 + 6  # killed: SIGTERM, SIGKILL after 5 s at most
    assert time.time() - begin < 120
    summary = (out / "summary.md").read_text()
    assert "| dit | timeout |" in summary and "stopped at its budget of 1 s" in summary

    # The total budget: a check that cannot get its minimum time is not started.
    result = _kit(tmp_path / "out2", "--only", "attention", "--total-budget", "3")
    assert result.returncode == 1
    status = _final_status(_records(tmp_path / "out2"))
    assert list(status) == ["environment", "attention"]  # the environment always comes first
    assert all(
        s["status"] == "skipped" and "left of the total budget" in s["detail"] for s in status.values()
    )


def test_kit_arguments_fail_in_one_line_before_anything_runs(tmp_path):
    from benchmarks.gpu import kit

    (tmp_path / "results.jsonl").write_text("earlier run\n")
    with pytest.raises(SystemExit, match=f"{tmp_path} already holds a kit run .*--overwrite"):
        kit.parse_args(["--out", str(tmp_path), "--cpu"])
    assert (tmp_path / "results.jsonl").read_text() == "earlier run\n"
    with pytest.raises(SystemExit, match="unknown check 'dti'"):
        kit.parse_args(["--out", str(tmp_path / "new"), "--budget", "dti=3"])
    with pytest.raises(SystemExit, match="--budget dit=-1: expected NAME=SECONDS with SECONDS > 0"):
        kit.parse_args(["--out", str(tmp_path / "new"), "--budget", "dit=-1"])
    with pytest.raises(SystemExit, match=r"unknown check\(s\) \['gpu'\]"):
        kit.parse_args(["--out", str(tmp_path / "new"), "--only", "attention,gpu"])
    assert (
        list(kit.parse_args(["--out", str(tmp_path / "new"), "--skip", "dit_wan22"]).checks)
        == CHECK_NAMES[:-1]
    )


def test_wheel_list_follows_the_pyproject_pins(tmp_path):
    import tomllib

    from benchmarks.gpu.machine import TRANSITIVE_PINS
    from benchmarks.gpu.prepare_wheels import requirements

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    pinned = [
        *project["dependencies"],
        *(s for extra in project["optional-dependencies"].values() for s in extra),
    ]
    wanted = requirements()
    assert [r for r in wanted if r in pinned] == wanted[: len(wanted) - len(TRANSITIVE_PINS)]
    assert {r.split("==")[0] for r in wanted} == {"diffusers", "hydra-core", *TRANSITIVE_PINS}
    unpinned = tmp_path / "pyproject.toml"
    unpinned.write_text('[project]\ndependencies = ["diffusers>=0.40", "hydra-core==1.3.8"]\n')
    with pytest.raises(ValueError, match=r"pyproject.toml: no exact '==' pin .*\['diffusers'\]"):
        requirements(unpinned)

"""Run summaries and `python -m t3.report` on a hand-made Hydra multirun folder."""

from __future__ import annotations

import json

import pytest
import yaml

from t3.report import collect, main
from t3.summary import read_run_summary, write_run_summary


def make_job(sweep, num, overrides, status=None, **summary):
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if status:
        write_run_summary(
            job,
            task="train",
            status=status,
            experiment="demo",
            overrides=overrides,
            resolved_config={"o": overrides},
            **summary,
        )


@pytest.fixture
def sweep(tmp_path):
    sweep = tmp_path / "multirun"
    sweep.mkdir()
    multirun = {"hydra": {"overrides": {"task": ["experiment=demo", "t3=dense,wan21_windows", "seed=0,1"]}}}
    (sweep / "multirun.yaml").write_text(yaml.safe_dump(multirun))
    speed = {"perf/step_time_s": 0.5, "device": "CPU test"}
    make_job(
        sweep,
        0,
        ["experiment=demo", "t3=dense", "seed=0"],
        "completed",
        metrics={"val/loss": 0.30},
        speed=speed,
    )
    make_job(
        sweep,
        1,
        ["experiment=demo", "t3=dense", "seed=1"],
        "completed",
        metrics={"val/loss": 0.31},
        speed=speed,
    )
    make_job(
        sweep, 2, ["experiment=demo", "t3=wan21_windows", "seed=0"], "failed", error="PlanError: layer 1 ..."
    )
    # job 3 (t3=wan21_windows seed=1) never started: no folder at all.
    return sweep


def test_summary_round_trip_and_validation(tmp_path):
    write_run_summary(
        tmp_path,
        task="eval",
        status="completed",
        experiment=None,
        overrides=["a=1"],
        resolved_config="x: 1",
        metrics={"fvd_i3d": float("nan"), "vtc_clip": 0.25},
    )
    summary = read_run_summary(tmp_path)
    assert summary["metrics"] == {"fvd_i3d": None, "vtc_clip": 0.25}  # non-finite -> null, valid JSON
    assert len(summary["config_digest"]) == 16 and not list(tmp_path.glob(".*tmp"))
    with pytest.raises(ValueError, match="status must be one of"):
        write_run_summary(
            tmp_path, task="eval", status="done", experiment=None, overrides=[], resolved_config=""
        )
    (tmp_path / "summary.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_run_summary(tmp_path)


def test_report_lists_completed_failed_and_missing_runs(sweep, capsys):
    report = collect(sweep)
    assert report.varying == ["seed", "t3"]
    assert [r.status for r in report.runs] == ["completed", "completed", "failed"]
    assert report.missing == [["experiment=demo", "t3=wan21_windows", "seed=1"]]
    assert main([str(sweep)]) == 1  # not every run completed
    out = capsys.readouterr().out
    assert "2 completed, 1 failed, 1 missing" in out
    assert "| 0 | t3=dense seed=0 | completed | 0.3 | 0.5 | CPU test |" in out
    assert "t3=wan21_windows seed=1: missing" in out and "PlanError: layer 1" in out
    table = json.loads((sweep / "report.json").read_text())
    assert table["header"][:4] == ["run", "variant", "status", "val/loss"]
    assert (sweep / "report.csv").read_text().count("\n") == 5
    assert (sweep / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_report_errors_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="sweep folder not found"):
        collect(tmp_path / "nope")


def test_summary_error_is_one_line_leading_with_the_root_cause():
    from t3.summary import describe_error

    try:
        try:
            raise FileNotFoundError("no .tar shards in /data/x\nsecond line")
        except FileNotFoundError as inner:
            raise RuntimeError("Error in call to target 'build':\nFileNotFoundError(...)") from inner
    except RuntimeError as err:
        wrapped = err
    assert describe_error(wrapped) == (
        "FileNotFoundError: no .tar shards in /data/x (raised as RuntimeError: Error in call to target 'build':)"
    )
    assert describe_error(ValueError("")) == "ValueError"
    assert (
        describe_error(ValueError("x" * 1000)).endswith("...")
        and len(describe_error(ValueError("x" * 1000))) == 600
    )

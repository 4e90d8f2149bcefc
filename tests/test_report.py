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
    assert "| t3=dense seed=0 | completed | 0.3 | +0 | 0.5 | 1.00x | CPU test |" in out
    assert "| t3=dense seed=1 | completed | 0.31 | +0.01 | 0.5 | 1.00x | CPU test |" in out
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


def test_report_table_has_chosen_columns_and_deltas_while_the_files_keep_everything(tmp_path, capsys):
    sweep = tmp_path / "study"
    for num, (schedule, loss, step, macs) in enumerate(
        [("wan21_windows", 0.32, 0.25, 6.4e6), ("dense", 0.30, 1.0, 55.3e6), ("wan21_windows_unshared", 0.31, 0.5, 12.8e6)]
    ):  # fmt: skip
        make_job(
            sweep,
            num,
            ["experiment=demo", f"t3={schedule}"],
            "completed",
            metrics={"val/loss": loss, "train/loss": 1.0, "train/lr": 2e-5},
            speed={
                "perf/step_time_s": step,
                "perf/samples_per_s": 4 / step,
                "macs/self_attention": macs,
                "device": "CPU test",
            },  # fmt: skip
            checkpoint=str(tmp_path / "abs" / "export" / str(num)),
        )
    assert main([str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "Baseline: t3=dense" in out  # a dense run is the baseline when there is one
    assert "| variant | status | val/loss | Δ val/loss | perf/step_time_s | perf/step_time_s / baseline " \
           "| self-attention MACs | device |" in out  # fmt: skip
    assert "| t3=wan21_windows | completed | 0.32 | +0.02 | 0.25 | 0.25x | 6.4 M | CPU test |" in out
    assert "| t3=dense | completed | 0.3 | +0 | 1 | 1.00x | 55.3 M | CPU test |" in out
    assert str(tmp_path) not in out and "train/lr" not in out  # no raw keys, no absolute paths
    markdown = (sweep / "report.md").read_text()
    assert markdown.count("| t3=") == 3 and str(tmp_path) not in markdown
    # The files keep every figure, path and folder.
    data = json.loads((sweep / "report.json").read_text())
    assert {"run", "train/lr", "perf/samples_per_s", "checkpoint", "error"} <= set(data["header"])
    assert data["baseline"] == "t3=dense"
    assert (
        "train/lr" in (sweep / "report.csv").read_text()
        and str(tmp_path) in (sweep / "report.csv").read_text()
    )
    # Another baseline, by its label.
    assert main([str(sweep), "--baseline", "t3=wan21_windows"]) == 0
    assert "| t3=dense | completed | 0.3 | -0.02 | 1 | 4.00x | 55.3 M | CPU test |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--baseline 't3=nope': no completed run of that variant"):
        main([str(sweep), "--baseline", "t3=nope"])

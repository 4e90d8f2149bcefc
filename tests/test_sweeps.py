"""Ablation sweeps: every study's jobs compose, fit their grid and get folders of their own; the ablation
schedules are what their comments say; a tiny 4-run sweep trains, writes summaries and is reported."""

from __future__ import annotations

import functools
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from t3.config import register_configs, validate

from .conftest import REPO_ROOT

CONF = REPO_ROOT / "conf"
ABLATIONS = sorted(p.stem for p in (CONF / "experiment").glob("ablation_*.yaml"))
ABLATION_SCHEDULES = sorted(p.stem for p in (CONF / "t3").glob("ablation_*.yaml"))
# The studies, and the keys each one sweeps (ablation_base and ablation_demo support them).
STUDIES = {
    "ablation_branches": {"t3"},
    "ablation_windows": {"t3"},
    "ablation_period": {"t3"},
    "ablation_full_frame_layers": {"t3"},
    "ablation_trainable": {"finetune.trainable", "optim.lr"},
    "ablation_lora_rank": {"finetune.lora.rank"},
    "ablation_resolution": {"data"},
    "ablation_objective": {"objective.timestep_sampler", "objective.loss_weighting"},
}
GRIDS = {  # token grids of Wan2.1 at 81 frames: 480p, 720p, 1088p, 4K
    "480x832": (21, 30, 52),
    "720x1280": (21, 45, 80),
    "1088x1920": (21, 68, 120),
    "2176x3840": (21, 136, 240),
}
WHOLE_FRAME = (1, None, None)


def _plain_default(overrides: tuple[str, ...]) -> list[str]:
    """Without an ``experiment=`` override, drop the default ``demo`` experiment (``python train.py``)."""
    has_experiment = any(o.lstrip("+~").startswith("experiment") for o in overrides)
    return list(overrides) if has_experiment else ["~experiment", *overrides]


def compose_with_hydra(*overrides: str, root: Path | str = "/nonexistent/t3-test-root") -> DictConfig:
    """``conf/train.yaml`` with ``overrides``, including the ``hydra`` node (sweeper, sweep folders)."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            config_name="train",
            overrides=[f"paths.root_dir={root}", *_plain_default(overrides)],
            return_hydra_config=True,
        )


def sweep_jobs(cfg: DictConfig, *command_line: str) -> list[list[str]]:
    """The override lists Hydra's basic sweeper makes from ``hydra.sweeper.params`` and ``command_line``
    (command-line values replace the study's for the same key, as with ``python train.py -m``)."""
    params = cfg.hydra.sweeper.params or {}
    arguments = [f"{k}={v}" for k, v in params.items()] + list(command_line)
    parsed = OverridesParser.create().parse_overrides(arguments)
    return [list(job) for batch in BasicSweeper.split_arguments(parsed, max_batch_size=None) for job in batch]


def test_every_study_of_the_issue_has_a_file():
    assert set(STUDIES) <= set(ABLATIONS)


@pytest.mark.parametrize("name", ABLATIONS)
def test_ablation_jobs_compose_fit_and_get_their_own_folders(name):
    cfg = compose_with_hydra(f"experiment={name}")
    jobs = sweep_jobs(cfg)
    swept = {o.partition("=")[0] for job in jobs for o in job}
    assert swept == STUDIES.get(name, swept), f"{name} sweeps {swept}"
    if name == "ablation_base":
        assert jobs == [[]]  # one run: the reference configuration
    else:
        assert len(jobs) >= 2
    folders = set()
    for job in jobs:
        job_cfg = compose_with_hydra(f"experiment={name}", *job, "dry_run=true")
        # The CPU demo is one process; the cluster studies are laid out for 8 GPUs.
        facts = validate(job_cfg, world_size=None if name == "ablation_demo" else 8)
        assert job_cfg.experiment_name == name and facts.num_layers >= 1
        assert job_cfg.hydra.sweep.dir.endswith(f"/sweeps/{name}")
        folders.add(job_cfg.hydra.job.override_dirname)
        # Only what the job varies names its folder (the study's keys), never paths or the experiment.
        assert job_cfg.hydra.job.override_dirname == ",".join(sorted(job)), job
    assert len(folders) == len(jobs)


def test_command_line_values_restrict_a_study_and_keep_its_folders():
    cfg = compose_with_hydra("experiment=ablation_branches")

    def folders(*command_line: str) -> list[str]:
        jobs = sweep_jobs(cfg, *command_line)
        return sorted(
            compose_with_hydra("experiment=ablation_branches", *j).hydra.job.override_dirname for j in jobs
        )

    full = folders()
    # A subset, run longer: the same folders as in the full study (step counts are not in the name).
    subset = folders("t3=dense,wan21_windows_local_only", "trainer.max_steps=3")
    assert subset == ["t3=dense", "t3=wan21_windows_local_only"] and set(subset) <= set(full)
    # A new dimension gets folders of its own instead of resuming the study's.
    assert folders("t3=dense", "seed=0,1") == ["seed=0,t3=dense", "seed=1,t3=dense"]


def test_demo_and_base_share_the_sweep_layout():
    base, demo = (
        OmegaConf.to_container(compose_with_hydra(f"experiment={n}"), resolve=False)
        for n in ("ablation_base", "ablation_demo")
    )
    assert base["run_dir"] == demo["run_dir"] == "${hydra:runtime.output_dir}"
    for key in ("run", "sweep"):
        assert base["hydra"][key] == demo["hydra"][key], key
    assert base["hydra"]["job"]["config"] == demo["hydra"]["job"]["config"]


@functools.cache
def build_schedule(name: str):
    """The schedule of ``conf/t3/<name>.yaml`` (schedules are frozen, so one build serves every test)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return instantiate(compose(overrides=[f"+t3={name}"]).t3)


@pytest.mark.parametrize("name", ABLATION_SCHEDULES)
def test_ablation_schedules_fit_every_resolution_of_the_studies(name):
    schedule = build_schedule(name)
    assert schedule.name == name and schedule.share_identical_branches
    for grid in GRIDS.values():
        assert len(schedule.plans(grid, 30)) == 30
    assert len(schedule.plans((5, 2, 2), 5)) == 5  # the tiny model of the demo and tests


def layer_windows(name: str, num_layers: int = 30) -> list[tuple]:
    schedule = build_schedule(name)
    return [schedule.rules[i % schedule.period].window for i in range(num_layers)]


def test_period_variants_keep_the_plans_and_their_share_of_layers():
    authors = layer_windows("wan21_windows")
    for period, run in ((10, 2), (15, 3), (30, 6)):
        windows = layer_windows(f"ablation_period{period}")
        assert build_schedule(f"ablation_period{period}").period == period
        assert Counter(windows) == Counter(authors)  # same plans, same attention cost
        assert windows[::run] == authors[: 30 // run]  # the authors' order, each plan `run` layers long


def test_full_frame_variants_put_whole_frames_where_they_say():
    def whole_frame_layers(name):
        return [i for i, w in enumerate(layer_windows(name)) if w == WHOLE_FRAME]

    assert whole_frame_layers("wan21_windows") == [0, 5, 10, 15, 20, 25]
    assert whole_frame_layers("ablation_full_frame_none") == []
    assert whole_frame_layers("ablation_full_frame_ends") == [0, 29]
    assert whole_frame_layers("ablation_full_frame_early") == [0, 1, 2, 3, 4, 5]
    assert whole_frame_layers("ablation_full_frame_late") == [24, 25, 26, 27, 28, 29]
    windowed = {w for w in layer_windows("wan21_windows") if w != WHOLE_FRAME}
    for name in ("none", "ends", "early", "late"):
        assert {w for w in layer_windows(f"ablation_full_frame_{name}") if w != WHOLE_FRAME} == windowed


def test_window_variants_scale_only_the_spatial_sides():
    authors = build_schedule("wan21_windows").rules
    for name, scale in (("ablation_windows_small", 0.5), ("ablation_windows_large", 2.0)):
        rules = build_schedule(name).rules
        assert len(rules) == len(authors)
        for mine, theirs in zip(rules, authors, strict=True):
            assert mine.window[0] == theirs.window[0] and mine.branches == theirs.branches
            for side, base in zip(mine.window[1:], theirs.window[1:], strict=True):
                assert side == (None if base is None else math.floor(base * scale))


# --- end to end -----------------------------------------------------------------------------------------

TINY_SWEEP = ["experiment=ablation_demo", "t3=dense,wan21_windows_local_only", "trainer.max_steps=1"]
TINY_FOLDERS = [
    "finetune.trainable=all,t3=dense",
    "finetune.trainable=all,t3=wan21_windows_local_only",
    "finetune.trainable=attention,t3=dense",
    "finetune.trainable=attention,t3=wan21_windows_local_only",
]


def run_train(tmp_path: Path, *overrides: str, ok: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "train.py", "-m", *overrides, f"paths.root_dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert (proc.returncode == 0) == ok, (
        f"{' '.join(cmd)}: exit status {proc.returncode}\n{proc.stderr[-4000:]}"
    )
    return proc


def run_folders(sweep: Path) -> list[str]:
    return sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))


@pytest.mark.slow
def test_tiny_sweep_trains_every_job_and_reports_them(tmp_path, capsys):
    import torch

    from t3.report import main as report_main
    from t3.summary import read_run_summary

    run_train(tmp_path, *TINY_SWEEP)
    sweep = tmp_path / "outputs" / "sweeps" / "ablation_demo"
    assert run_folders(sweep) == TINY_FOLDERS
    for folder in TINY_FOLDERS:
        summary = read_run_summary(sweep / folder)
        assert summary["status"] == "completed" and summary["experiment"] == "ablation_demo", summary
        assert set(folder.split(",")) <= set(summary["overrides"])
        assert all(math.isfinite(summary["metrics"][key]) for key in ("train/loss", "val/loss"))
        assert summary["speed"]["perf/step_time_s"] > 0 and summary["speed"]["device"]
        assert summary["checkpoint"] and Path(summary["checkpoint"]).exists()

    assert report_main([str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "4 completed" in out and "missing" not in out
    assert "t3=dense finetune.trainable=all" in out
    assert "t3=wan21_windows_local_only finetune.trainable=attention" in out
    assert (sweep / "report.csv").read_text().count("\n") == 5 and (sweep / "report.png").is_file()

    # Part of the study again, one step longer, plus a schedule that cannot fit the tiny model's grid:
    # the old job continues in its own folder, the impossible one fails alone and is reported with its reason.
    sweep_again = [
        "experiment=ablation_demo",
        "t3=dense,wan21_4k",
        "finetune.trainable=all",
        "trainer.max_steps=2",
    ]
    run_train(tmp_path, *sweep_again, ok=False)
    last = sweep / TINY_FOLDERS[0] / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 2
    failed = read_run_summary(sweep / "finetune.trainable=all,t3=wan21_4k")
    assert failed["status"] == "failed" and "does not fit" in failed["error"]
    assert report_main([str(sweep)]) == 1
    out = capsys.readouterr().out
    assert "4 completed, 1 failed" in out and "ConfigError: t3='wan21_4k' does not fit" in out


@pytest.mark.slow
def test_local_launcher_runs_a_job_in_its_own_process(tmp_path):
    from t3.summary import read_run_summary

    run_train(
        tmp_path,
        "experiment=ablation_demo",
        "hydra/launcher=local",
        "t3=dense",
        "finetune.trainable=attention",
        "trainer.max_steps=1",
    )
    sweep = tmp_path / "outputs" / "sweeps" / "ablation_demo"
    assert read_run_summary(sweep / "finetune.trainable=attention,t3=dense")["status"] == "completed"
    assert list((sweep / ".submitit").glob("*/*_result.pkl"))  # it ran as a submitit job


def test_every_job_of_a_sweep_gets_its_own_wandb_run_name_in_one_group_per_study(monkeypatch, tmp_path):
    import importlib

    from t3.training.train import wandb_name_and_group

    train_module = importlib.import_module("t3.training.train")  # t3.training.train is also the function

    cfg = compose_with_hydra("experiment=ablation_trainable")
    identities = set()
    for job in sweep_jobs(cfg):
        job_cfg = compose_with_hydra("experiment=ablation_trainable", *job, "logger=wandb")
        variant = job_cfg.hydra.job.override_dirname
        identities.add(wandb_name_and_group(job_cfg, variant))
        # The WandbLogger the run builds carries them (it starts no wandb run before its first log).
        monkeypatch.setattr(train_module, "_sweep_variant", lambda variant=variant: variant)
        (wandb,) = [
            lg for lg in train_module._build_loggers(job_cfg, tmp_path) if "Wandb" in type(lg).__name__
        ]
        assert (wandb._wandb_init["name"], wandb._wandb_init["group"]) == wandb_name_and_group(
            job_cfg, variant
        )
    names = {name for name, _ in identities}
    assert len(names) == 6 and "ablation_trainable/finetune.trainable=lora,optim.lr=0.0001" in names
    assert {group for _, group in identities} == {"ablation_trainable"}
    # A single run keeps its experiment's name, without a group; explicit values win.
    single = compose_with_hydra("experiment=t3_720p", "logger=wandb")
    assert wandb_name_and_group(single, None) == ("t3_720p", None)
    named = compose_with_hydra("experiment=t3_720p", "logger=wandb", "logger.name=mine", "logger.group=g")
    assert wandb_name_and_group(named, "seed=1") == ("mine", "g")

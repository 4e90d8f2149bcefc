"""Every conf/t3/*.yaml composes with Hydra and builds the schedule it names."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from t3.attention import PRESETS, Schedule
from t3.attention.schedule import WAN21_4K_GRID

from .conftest import REPO_ROOT

# from_checkpoint is eval.py's "the schedule the checkpoint's record names", not a schedule (test_record.py).
T3_CONFIGS = sorted(p.stem for p in (REPO_ROOT / "conf" / "t3").glob("*.yaml") if p.stem != "from_checkpoint")


def build(name: str) -> Schedule:
    with initialize_config_dir(config_dir=str(Path(REPO_ROOT / "conf")), version_base="1.3"):
        cfg = compose(overrides=[f"+t3={name}"])
    return instantiate(cfg.t3)


@pytest.mark.parametrize("name", T3_CONFIGS)
def test_t3_config_builds_a_schedule_that_fits_4k(name):
    schedule = build(name)
    assert isinstance(schedule, Schedule) and schedule.name == name
    if name.startswith("wan21") or name == "dense":
        assert len(schedule.plans(WAN21_4K_GRID, 30)) == 30
    if name in PRESETS:
        assert schedule == PRESETS[name]


def test_ablation_configs_change_only_what_they_name():
    base = build("wan21_windows")
    assert build("wan21_windows_local_only").rules == tuple(
        type(r)(window=r.window, branches=("local",)) for r in base.rules
    )
    unshared = build("wan21_windows_unshared")
    assert unshared.rules == base.rules and not unshared.share_identical_branches

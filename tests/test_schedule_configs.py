"""Every conf/t3/*.yaml composes with Hydra and builds the schedule it names."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from t3.attention import PRESETS, Schedule
from t3.attention.schedule import WAN21_4K_GRID

from .conftest import REPO_ROOT

# from_checkpoint is eval.py's "the schedule the checkpoint's record names" (test_record.py), model_default
# train.py's "the model's own preset" (below): choices of a schedule, not schedules.
CHOICES = ("from_checkpoint", "model_default")
T3_CONFIGS = sorted(p.stem for p in (REPO_ROOT / "conf" / "t3").glob("*.yaml") if p.stem not in CHOICES)


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
        assert schedule == PRESETS[name] and schedule.made_for == PRESETS[name].made_for


def test_every_preset_has_its_config():
    assert set(PRESETS) <= set(T3_CONFIGS)


@pytest.mark.parametrize("name", T3_CONFIGS)
def test_every_schedule_says_what_it_was_made_for(name):
    """dense fits any model; the authors' fixed pieces one model and grid; window sizes one token size."""
    made_for = build(name).made_for
    if name == "dense":
        assert made_for is None
    elif name.endswith("_4k"):
        assert made_for.model is not None and made_for.grid is not None and made_for.other_grids in PRESETS
    else:
        assert made_for.token_size == ((4, 32, 32) if name.startswith("wan22") else (4, 16, 16))


def test_ablation_configs_change_only_what_they_name():
    base = build("wan21_windows")
    assert build("wan21_windows_local_only").rules == tuple(
        type(r)(window=r.window, branches=("local",)) for r in base.rules
    )
    unshared = build("wan21_windows_unshared")
    assert unshared.rules == base.rules and not unshared.share_identical_branches

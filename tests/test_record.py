"""The T3 record: which schedule (and model, size, step, config) a checkpoint was trained with.

Every export and every transformed model saved with diffusers carries it; `load_dit`, `t3.transform` and
``eval.py`` use it by default and refuse a different explicit schedule unless asked.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import WanTransformer3DModel

import t3
from t3.attention import get_schedule
from t3.models import load_dit, read_record, save_dit
from t3.models.record import RECORD_KEY, SCHEMA_VERSION, ScheduleConflictError, T3Record
from t3.models.tiny import TINY_TEXT_DIM, tiny_dit
from t3.transform import schedule_of

RECORD = T3Record(
    schedule=get_schedule("dense"),
    model_preset="tiny",
    resolution=(32, 32, 17),
    step=7,
    config_digest="0123456789abcdef",
)


def test_record_round_trips_through_plain_json():
    data = json.loads(json.dumps(RECORD.as_dict()))
    assert data["schema_version"] == SCHEMA_VERSION and data["schedule"]["name"] == "dense"
    assert T3Record.from_dict(data, source="x") == RECORD
    windows = T3Record(schedule=get_schedule("wan21_windows"))
    assert T3Record.from_dict(json.loads(json.dumps(windows.as_dict())), source="x") == windows
    with pytest.raises(ValueError, match=r"ckpt/config.json: T3 record schema_version 99 is not supported"):
        T3Record.from_dict({**data, "schema_version": 99}, source="ckpt/config.json")
    with pytest.raises(ValueError, match=r"ckpt/config.json: T3 record: schedule"):
        T3Record.from_dict({**data, "schedule": {"name": "x", "rules": []}}, source="ckpt/config.json")


@pytest.mark.parametrize("layout", ["diffusers", "wan", "wan.safetensors"])
def test_exports_carry_the_record_and_load_with_its_schedule(layout, tmp_path):
    fmt, _, suffix = layout.partition(".")
    path = tmp_path / ("dit.safetensors" if suffix else "dit")
    save_dit(tiny_dit(), path, format=fmt, record=RECORD)
    assert read_record(path) == RECORD

    dit = load_dit(path, preset="tiny")  # the recorded schedule, by default
    assert schedule_of(dit) == RECORD.schedule
    with pytest.raises(ScheduleConflictError) as info:
        load_dit(path, preset="tiny", schedule="wan21_windows")
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "'dense'" in message
    assert "'wan21_windows'" in message and "allow_schedule_change" in message
    changed = load_dit(path, preset="tiny", schedule="wan21_windows", allow_schedule_change=True)
    assert schedule_of(changed) == get_schedule("wan21_windows")
    plain = load_dit(path, preset="tiny", transform=False)
    assert schedule_of(plain) is None and T3Record.from_config(plain.config) == RECORD
    # Saved again, the weights keep the record they were trained with.
    save_dit(plain, tmp_path / "again", format="diffusers")
    assert read_record(tmp_path / "again") == RECORD


def test_checkpoints_without_a_record_load_as_before(tmp_path):
    save_dit(tiny_dit(), tmp_path / "plain", format="diffusers")
    assert read_record(tmp_path / "plain") is None
    assert schedule_of(load_dit(tmp_path / "plain")) is None
    assert schedule_of(load_dit(tmp_path / "plain", schedule="wan21_windows")) == get_schedule(
        "wan21_windows"
    )


def test_a_transformed_model_saved_with_diffusers_carries_its_schedule_back(tmp_path):
    dit = t3.transform(tiny_dit(), "dense")
    dit.save_pretrained(tmp_path / "saved")
    assert (
        json.loads((tmp_path / "saved" / "config.json").read_text())[RECORD_KEY]["schedule"]["name"]
        == "dense"
    )

    loaded = WanTransformer3DModel.from_pretrained(tmp_path / "saved")
    t3.transform(loaded)  # no schedule given: the one it was saved with
    assert schedule_of(loaded) == get_schedule("dense")
    with pytest.raises(ScheduleConflictError, match=r"allow_schedule_change=True"):
        t3.transform(loaded, "wan21_windows")
    t3.transform(loaded, "wan21_windows", allow_schedule_change=True)
    assert schedule_of(loaded) == get_schedule("wan21_windows")
    x = torch.randn(1, 4, 2, 4, 4)
    with torch.no_grad():
        loaded(x, torch.tensor([10]), torch.randn(1, 3, TINY_TEXT_DIM), return_dict=False)
    with pytest.raises(ValueError, match=r"no schedule given and the model carries no T3 record"):
        t3.transform(tiny_dit())
    # In one session, a schedule chosen by an earlier transform of the same model binds nothing.
    fresh = t3.transform(tiny_dit(), "dense")
    t3.transform(fresh, "wan21_windows")
    assert T3Record.from_config(fresh.config).schedule == get_schedule("wan21_windows")


def test_eval_uses_the_checkpoints_schedule_and_refuses_another_unless_asked(tmp_path):
    from t3.eval.run import eval_schedule, main

    from .test_eval_generate import compose_eval

    save_dit(tiny_dit(), tmp_path / "dense_trained", record=RECORD)
    save_dit(tiny_dit(), tmp_path / "plain")
    base = ["model=tiny", "benchmark=tiny", f"out_dir={tmp_path / 'out'}", "dry_run=true",
            "generation.height=64", "generation.width=64", "generation.frames=5"]  # fmt: skip
    trained = f"ckpt={tmp_path / 'dense_trained'}"

    cfg = compose_eval(*base, trained)  # no t3=...: the schedule the checkpoint was trained with
    assert eval_schedule(cfg) == get_schedule("dense") and cfg.run_name == "tiny_dense"
    conflict = compose_eval(*base, trained, "t3=wan21_windows")
    with pytest.raises(
        ScheduleConflictError, match=r"was trained with T3 schedule 'dense', not 'wan21_windows'"
    ):
        eval_schedule(conflict)
    with pytest.raises(SystemExit, match=r"^eval error: ScheduleConflictError: .*allow_schedule_change=true"):
        main(conflict)
    allowed = compose_eval(*base, trained, "t3=wan21_windows", "allow_schedule_change=true")
    assert (
        eval_schedule(allowed) == get_schedule("wan21_windows") and allowed.run_name == "tiny_wan21_windows"
    )
    # No record (a Wan release, an older export) or no checkpoint: the default schedule, as before.
    plain = compose_eval(*base, f"ckpt={tmp_path / 'plain'}")
    assert eval_schedule(plain) == get_schedule("wan21_windows") and plain.run_name == "tiny_wan21_windows"
    assert eval_schedule(compose_eval(*base)) == get_schedule("wan21_windows")
    assert main(compose_eval(*base, trained, "num_shards=2")) == ["shard 0/2: 3 prompts (0..2)",
                                                                  "shard 1/2: 2 prompts (3..4)"]  # fmt: skip


def test_training_refuses_the_eval_only_schedule_choice():
    from t3.config import ConfigError, validate

    from .test_configs import compose_train

    with pytest.raises(ConfigError, match=r"t3=from_checkpoint: eval.py's default"):
        validate(compose_train("t3=from_checkpoint"))


@pytest.mark.parametrize(
    "model,schedule", [("wan2.1-t2v-1.3b", "wan21_windows"), ("wan2.2-ti2v-5b", "wan22_windows"), ("tiny", "wan21_windows")]
)  # fmt: skip
def test_eval_without_a_record_uses_the_schedule_the_model_config_names(model, schedule, tmp_path):
    """`eval.py model=wan2.2-ti2v-5b` used to evaluate with wan21_windows (the fixed fallback)."""
    from t3.eval.run import eval_schedule

    from .test_eval_generate import compose_eval

    cfg = compose_eval(f"model={model}", "model.dit_path=null", f"out_dir={tmp_path}")
    assert eval_schedule(cfg) == get_schedule(schedule) and cfg.run_name == f"{model}_{schedule}"
    explicit = compose_eval(f"model={model}", "model.dit_path=null", "t3=dense", f"out_dir={tmp_path}")
    assert eval_schedule(explicit) == get_schedule("dense")


@pytest.mark.parametrize(
    "overrides,words",
    [
        (["model=wan2.2-ti2v-5b", "t3=wan21_4k"], "schedule 'wan21_4k' was made for wan2.1-t2v-1.3b (30 layers, 12 heads, patch 1x2x2, VAE stride 4x8x8), not for wan2.2-ti2v-5b"),
        (["model=wan2.2-ti2v-5b", "t3=wan21_windows"], "schedule 'wan21_windows' counts its windows in tokens of 4x16x16"),
        (["model=wan2.1-t2v-1.3b", "t3=wan21_4k", "generation.height=720", "generation.width=1280"], "on other grids use 'wan21_windows'"),
    ],
)  # fmt: skip
def test_eval_refuses_a_schedule_made_for_another_model_or_grid(overrides, words, tmp_path):
    from t3.eval.run import main

    from .test_eval_generate import compose_eval

    cfg = compose_eval(
        *overrides, "model.dit_path=null", "benchmark=tiny", "dry_run=true", f"out_dir={tmp_path}"
    )
    with pytest.raises(SystemExit) as err:
        main(cfg)
    assert str(err.value).startswith("eval error: ") and "\n" not in str(err.value)
    assert "does not fit" in str(err.value) and words in str(err.value), str(err.value)

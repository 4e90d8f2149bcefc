"""The eval speed stage: tiny model measured on CPU; 4K MAC counts without any model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from t3.attention import get_schedule
from t3.attention.flops import dit_macs
from t3.eval import run
from t3.eval.speed_stage import speed_markdown
from t3.models import get_spec

from .test_eval_generate import compose_eval, save_tiny_models, tiny_overrides


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> Path:
    return save_tiny_models(tmp_path_factory.mktemp("speed_tiny_models"))


def test_speed_stage_measures_dense_and_t3_on_the_tiny_model(tiny_models, tmp_path):
    report = run(compose_eval(*tiny_overrides(
        tiny_models, tmp_path, "stage=speed", "t3=wan21_windows", "speed.warmup=1", "speed.repeats=1",
        "speed.e2e_steps=2",
    )))  # fmt: skip
    assert json.loads((tmp_path / "speed" / "speed.json").read_text()) == report
    setup = report["setup"]
    assert setup["device"].startswith("CPU") and setup["dtype"] == "float32"
    assert setup["attention_backend"] == "sdpa" and setup["weights"] == str(tiny_models / "dit")
    assert setup["token_grid"] == [2, 4, 4] and setup["cfg_batch"] == 2
    assert [r["schedule"] for r in report["results"]] == ["dense", "wan21_windows"]
    for row in report["results"]:
        assert row["dit_step_s"]["median"] > 0 and row["dit_step_s"]["repeats"] == 1
        # Attention and the whole step are timed separately (median of the repeats): on a loaded CPU
        # with one repeat of a tiny model their ratio can pass 1, so only its definition is checked.
        assert row["attention_s"] > 0
        assert row["attention_share"] == pytest.approx(row["attention_s"] / row["dit_step_s"]["median"])
        assert row["dit_step_peak_memory_bytes"] > 0
        assert row["e2e_s"]["steps"] == 2 and row["e2e_s"]["text_encoding"] > 0 and row["e2e_s"]["decode"] > 0
        assert row["e2e_s"]["dit_passes"] == 4  # 2 steps x 2 with CFG, stated beside the latency
    ratios = report["ratios"]["dense/wan21_windows"]
    assert {
        "dit_step_macs",
        "self_attention_macs",
        "dit_step_latency",
        "attention_latency",
        "e2e_latency",
    } <= set(ratios)
    table = (tmp_path / "speed" / "speed.md").read_text()
    assert "| dense |" in table and "| wan21_windows |" in table and "Device: CPU" in table
    assert table.count(" (4 DiT passes) |") == 2


def test_speed_macs_only_counts_4k_without_a_model(tmp_path):
    report = run(compose_eval(
        "stage=speed", "model=wan2.1-t2v-1.3b", "t3=wan21_windows", "speed.macs_only=true",
        "model.dit_path=null", f"out_dir={tmp_path}",
    ))  # fmt: skip
    assert report["setup"]["token_grid"] == [21, 136, 240] and "device" not in report["setup"]
    config, grid = get_spec("wan2.1-t2v-1.3b").dit_config, (21, 136, 240)
    dense = dit_macs(config, grid, batch=2, schedule=get_schedule("dense"))
    t3 = dit_macs(config, grid, batch=2, schedule=get_schedule("wan21_windows"))
    rows = {r["schedule"]: r["macs"] for r in report["results"]}
    assert rows["dense"]["dit_step"] == dense.total and rows["wan21_windows"]["dit_step"] == t3.total
    assert rows["dense"]["dit_video"] == 50 * dense.total
    ratios = report["ratios"]["dense/wan21_windows"]
    # The README's figures for the authors' 4K schedule: 72.8x less self-attention, 29.8x less DiT work.
    assert ratios["self_attention_macs"] == pytest.approx(72.8, abs=0.05)
    assert ratios["dit_step_macs"] == pytest.approx(29.8, abs=0.05)
    assert "MACs only" in speed_markdown(report)
    assert report["setup"]["dit_passes_per_video"] == 100
    assert "A video is 100 DiT passes (50 steps x 2 with CFG)" in speed_markdown(report)
    # The run leaves a summary.json beside speed.json for `python -m t3.report`.
    from t3.summary import read_run_summary

    summary = read_run_summary(tmp_path / "speed")
    assert summary["task"] == "eval/speed" and summary["status"] == "completed"
    assert summary["speed"]["dense/wan21_windows/dit_step_macs"] == pytest.approx(29.8, abs=0.05)


def test_speed_stage_refuses_a_size_beyond_the_models_rope_table_before_building(tmp_path, monkeypatch):
    """`stage=speed model=tiny` at the default 4K size used to crash inside diffusers' RoPE."""
    import t3.eval.speed_stage

    monkeypatch.setattr(t3.eval.speed_stage, "_build_dit", _must_not_build)
    with pytest.raises(ValueError) as err:
        run(compose_eval("stage=speed", "model=tiny", f"out_dir={tmp_path}"))
    message = str(err.value)
    assert "\n" not in message
    assert (
        "give the token grid (21, 136, 240), but tiny's rotary embedding covers at most 32 positions per axis"
        in message
    )
    assert "height and width at most 512, frames at most 125" in message


def test_speed_stage_refuses_what_cannot_fit_in_memory_before_building(tmp_path, monkeypatch):
    """`stage=speed model=wan2.1-t2v-1.3b t3=wan21_4k` on a CPU used to be OOM-killed without a message."""
    import t3.eval.speed_stage
    import t3.memory
    from t3.memory import GIB, DoesNotFitError

    monkeypatch.setattr(t3.eval.speed_stage, "_build_dit", _must_not_build)
    monkeypatch.setattr(t3.memory, "available_memory", lambda device: (32 * GIB, "available host memory"))
    cfg = compose_eval(
        "stage=speed", "model=wan2.1-t2v-1.3b", "t3=wan21_4k", "model.dit_path=null", f"out_dir={tmp_path}"
    )
    with pytest.raises(DoesNotFitError) as err:
        run(cfg)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(
        "stage=speed: one DiT forward of wan2.1-t2v-1.3b at 2176x3840x81 (685,440 tokens"
    )
    assert (
        "5.3 GiB of weights + 108.5 GiB of activations, but the cpu has 32.0 GiB available host memory"
        in message
    )
    assert "run instead: speed.macs_only=true" in message
    assert "generation.height=480 generation.width=832" in message
    assert not (tmp_path / "speed").exists()


def _must_not_build(*args, **kwargs):
    raise AssertionError("the speed stage built a model for a run it should have refused")

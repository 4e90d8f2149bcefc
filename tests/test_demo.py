"""The embedded CPU demo (``experiment=demo``, `t3.demo.run_demo`): its config, and every stage end to end
in the fast smoke variant (``demo.fast=true``, ~6 s here), twice, the second reusing the pretraining cache."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra

from t3.config import TrainConfig, register_configs, validate
from t3.demo import FD_NAME, MODEL_NAMES, demo_settings, pretrain_config, pretrain_key, run_demo

from .conftest import REPO_ROOT


def _register_schema() -> None:
    """The training schema, with a ``demo`` node.

    ``conf/experiment/demo.yaml`` adds a top-level ``demo`` node, which the schema must allow
    (``demo: Any = None`` in `t3.config.TrainConfig`). Until it does, the test composes against a
    subclass that adds just that field, so the demo itself can be tested meanwhile.
    """
    register_configs()
    if "demo" not in {f.name for f in dataclasses.fields(TrainConfig)}:
        schema = dataclasses.make_dataclass(
            "TrainConfigWithDemo", [("demo", Any, dataclasses.field(default=None))], bases=(TrainConfig,)
        )
        ConfigStore.instance().store(name="train_schema", node=schema)


def compose_demo(root: Path, *overrides: str):
    """``python train.py experiment=demo <overrides>`` as a config, with everything under ``root``."""
    _register_schema()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
            return compose(
                config_name="train", overrides=["experiment=demo", f"paths.root_dir={root}", *overrides]
            )
    finally:
        register_configs()  # other tests compose against the plain schema


def test_demo_config_composes_and_fits():
    """The demo's own settings: a valid fine-tune config, a cutting schedule, a pretraining config."""
    cfg = compose_demo(Path("/nonexistent/t3-demo-root"))
    facts = validate(cfg, world_size=1)
    assert cfg.experiment_name == "demo" and cfg.run_dir.endswith("outputs/demo")
    assert facts.grid == (5, 8, 12) and not facts.schedule.is_dense
    # Every layer after the first cuts the grid into windows where local and dilated branches differ.
    plans = facts.schedule.plans(facts.grid, facts.num_layers)
    assert all(lp.computed == ("local", "dilated") for lp in plans[1:])

    cfg, demo = demo_settings(cfg)
    pre = pretrain_config(cfg, demo)
    pre_facts = validate(pre, world_size=1)
    assert pre_facts.schedule.is_dense and pre_facts.grid == (5, 4, 4)
    assert pre.model.random_init and pre.model.init_from is None
    assert "/demo/pretrain-" in pre.run_dir and pre.trainer.max_steps == demo.pretrain.steps
    # The cache key follows the pretraining settings and nothing that leaves the weights alone.
    key = pretrain_key(cfg, demo)
    assert pretrain_key(compose_demo(Path("/elsewhere")), demo) == key
    assert (
        pretrain_key(cfg, dataclasses.replace(demo, pretrain=dataclasses.replace(demo.pretrain, steps=7)))
        != key
    )


def test_demo_experiment_builds_on_meta():
    """What tests/test_configs.py checks for every experiment (dry run on the meta device)."""
    from t3.training.plan import build_plan

    cfg = compose_demo(Path("/nonexistent/t3-demo-root"), "dry_run=true")
    facts = validate(cfg)
    plan = build_plan(cfg, facts)
    assert plan.macs_t3.total <= plan.macs_dense.total and plan.num_trainable > 0


def _check_outputs(summary: dict[str, Any], out_dir: Path) -> None:
    rows = summary["results"]["rows"]
    assert [r["name"] for r in rows] == list(MODEL_NAMES)
    for row in rows:
        numbers = [row["heldout_loss"], row[FD_NAME], *row["latency_ms"].values()]
        numbers += list(row["heldout_loss_per_sigma"].values())
        assert all(math.isfinite(x) for x in numbers), row
    macs = summary["results"]["macs"]["eval"]
    assert macs["self_attention_ratio"] > 1
    for key in ("markdown", "json", "plot"):
        path = Path(summary["outputs"][key])
        assert path.parent == out_dir and path.is_file() and path.stat().st_size > 0
    assert any(p.endswith(".mp4") and Path(p).stat().st_size > 0 for p in summary["outputs"]["videos"])
    markdown = (out_dir / "results.md").read_text()
    assert all(MODEL_NAMES[name] in markdown for name in MODEL_NAMES)
    assert "Not I3D-FVD" in markdown
    stored = json.loads((out_dir / "results.json").read_text())
    assert stored["table"] == summary["table"]


def test_demo_fast_end_to_end_and_pretrain_cache(tmp_path, caplog):
    cfg = compose_demo(tmp_path, "demo.fast=true")
    out_dir = tmp_path / "outputs" / "demo"

    with caplog.at_level(logging.INFO, logger="t3.demo"):
        first = run_demo(cfg)
    assert not first["pretrain"]["cached"]
    assert Path(first["pretrain"]["export"], "config.json").is_file()
    _check_outputs(first, out_dir)
    # The fine-tune's own last validation used the same held-out set and noise as the comparison.
    assert first["results"]["num_heldout"] == 4
    after = first["results"]["rows"][2]["heldout_loss"]
    assert first["finetune"]["final_val_loss"] == pytest.approx(after, rel=1e-4)

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="t3.demo"):
        second = run_demo(cfg)
    assert second["pretrain"]["cached"] and second["pretrain"]["run_dir"] == first["pretrain"]["run_dir"]
    assert "reusing the pretrained dense model" in caplog.text
    assert second["timings_s"]["pretrain"] < min(1.0, first["timings_s"]["pretrain"])
    _check_outputs(second, out_dir)
    # Same pretrained weights, same held-out set and noise: the untouched models score the same.
    for a, b in zip(first["results"]["rows"][:2], second["results"]["rows"][:2], strict=True):
        assert a["heldout_loss"] == pytest.approx(b["heldout_loss"], rel=1e-5)

"""The embedded CPU demo (``experiment=demo``, `t3.demo.run_demo`): its config, the held-out loss it shares
with training, and every stage end to end in the fast smoke variant (``demo.fast=true``, ~10 s here), twice,
the second reusing the pretraining cache."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from t3.attention import get_schedule
from t3.config import TRAIN_ENTRY, ConfigError, entry_function, register_configs, validate
from t3.demo import (
    FD_NAME,
    MODEL_NAMES,
    DemoConfig,
    demo_settings,
    finetune_config,
    pretrain_config,
    pretrain_key,
    run_demo,
)

from .conftest import REPO_ROOT


def compose_demo(root: Path, *overrides: str):
    """``python train.py experiment=demo <overrides>`` as a config, with everything under ``root``."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        return compose(
            config_name="train", overrides=["experiment=demo", f"paths.root_dir={root}", *overrides]
        )


def test_demo_config_composes_and_fits():
    """The demo's own settings: a valid fine-tune config, a cutting schedule, a pretraining config."""
    cfg = compose_demo(Path("/nonexistent/t3-demo-root"))
    facts = validate(cfg, world_size=1)
    assert cfg.experiment_name == "demo" and cfg.run_dir.endswith("outputs/demo")
    # train.py reaches the demo through the config's entry, like any other experiment.
    assert entry_function(cfg.entry) is run_demo.__globals__["main"]
    assert facts.grid == (5, 8, 12) and not facts.schedule.is_dense
    # Every layer after the first cuts the grid into windows where local and dilated branches differ.
    plans = facts.schedule.plans(facts.grid, facts.num_layers)
    assert all(lp.computed == ("local", "dilated") for lp in plans[1:])

    cfg, demo = demo_settings(cfg)
    assert isinstance(demo, DemoConfig)
    pre = pretrain_config(cfg, demo)
    pre_facts = validate(pre, world_size=1)
    assert pre_facts.schedule is get_schedule("dense") and pre_facts.grid == (5, 4, 4)
    assert pre.model.random_init and pre.model.init_from is None
    # Every stage is a plain training run: training's entry, no demo settings.
    assert pre.entry == TRAIN_ENTRY and pre.demo is None
    assert "/demo/pretrain-" in pre.run_dir and pre.trainer.max_steps == demo.pretrain.steps
    # The cache key follows the pretraining settings and nothing that leaves the weights alone.
    key = pretrain_key(cfg, demo)
    assert pretrain_key(compose_demo(Path("/elsewhere")), demo) == key
    assert (
        pretrain_key(cfg, dataclasses.replace(demo, pretrain=dataclasses.replace(demo.pretrain, steps=7)))
        != key
    )


def test_demo_control_differs_from_the_t3_fine_tune_only_in_attention(tmp_path):
    """The dense fine-tune (the control) trains as the T3 one does: same size, steps, data, seed, optimizer."""
    cfg, _ = demo_settings(compose_demo(tmp_path))
    configs = {a: finetune_config(cfg, tmp_path, a) for a in ("t3", "dense")}
    schedules = {a: validate(c, world_size=1).schedule for a, c in configs.items()}
    assert schedules["dense"] is get_schedule("dense") and schedules["t3"].name == cfg.t3.name
    resolved = {a: OmegaConf.to_container(c, resolve=True) for a, c in configs.items()}
    for settings in resolved.values():
        for key in ("experiment_name", "run_dir", "t3"):
            settings.pop(key)
    assert resolved["t3"] == resolved["dense"]
    assert configs["t3"].model.init_from == str(tmp_path)
    assert configs["t3"].trainer.max_steps == cfg.trainer.max_steps


def test_demo_heldout_loss_is_the_training_validation():
    """The demo's held-out loss and the training module's ``val/loss`` are one function
    (`t3.diffusion.heldout_loss`): on the same model, set and seed they agree per level and in the mean,
    however the set is cut into batches."""
    import torch

    from t3.config import FinetuneConfig, ModelConfig, ObjectiveConfig, OptimConfig, ValidationConfig
    from t3.demo.metrics import heldout_set_loss
    from t3.models import get_spec
    from t3.training.module import T3FinetuneModule

    validation = ValidationConfig(sigmas=[0.2, 0.6, 0.9], seed=7)
    module = T3FinetuneModule(
        model=ModelConfig(preset="tiny", random_init=True), schedule=get_schedule("dense"),
        finetune=FinetuneConfig(gradient_checkpointing=False), optim=OptimConfig(), objective=ObjectiveConfig(),
        validation=validation, max_steps=1, seed=0,
    )  # fmt: skip
    module.configure_model()
    module.dit.eval()
    logged: dict[str, list[tuple[float, int]]] = {}

    def log(name: str, value: Any, **kw: Any) -> None:
        logged.setdefault(name, []).append((float(value), kw["batch_size"]))

    module.log = log
    spec = get_spec("tiny")
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(6, *spec.latent_shape(5, 32, 32), generator=generator)
    text = torch.randn(6, spec.text_len, spec.text_dim, generator=generator)
    with torch.no_grad():
        for start in (0, 4):  # the validation loader's batches of 4, the last one short
            end = min(start + 4, len(latents))
            batch = {
                "latents": latents[start:end],
                "text": text[start:end],
                "position": torch.arange(start, end),
            }
            module.validation_step(batch, 0)

    def epoch_value(name: str) -> float:  # Lightning's on_epoch reduction: the batch-size-weighted mean
        values = logged[name]
        return sum(v * n for v, n in values) / sum(n for _, n in values)

    demo = heldout_set_loss(
        module.dit, latents, text, sigmas=validation.sigmas, seed=7, batch_size=3, num_train_timesteps=1000
    )
    for sigma in validation.sigmas:
        assert epoch_value(f"val/loss_sigma_{sigma:g}") == pytest.approx(demo[f"sigma={sigma:g}"], rel=1e-5)
    assert epoch_value("val/loss") == pytest.approx(demo["mean"], rel=1e-5)


def test_demo_settings_are_typed_and_checked(tmp_path):
    """``demo`` is a typed node of the training schema: a misspelt key or a wrong type fails at composition,
    a count out of range in one line naming it; other experiments have none, and train.py trains them."""
    cfg = compose_demo(tmp_path)
    assert OmegaConf.get_type(cfg.demo) is DemoConfig
    for bad in ("demo.fastt=true", "demo.pretrain.steps=many"):
        with pytest.raises(ConfigCompositionException):
            compose_demo(tmp_path, bad)
    with pytest.raises(ConfigError, match=r"^demo\.eval\.sample_steps=0: must be >= 1$"):
        demo_settings(compose_demo(tmp_path, "demo.eval.sample_steps=0"))
    with pytest.raises(
        ConfigError,
        match=r"^demo\.pretrain \(stage 1, dense pretraining\): data\.height 40 is not a multiple of 16",
    ):
        run_demo(compose_demo(tmp_path, "demo.pretrain.height=40"))
    assert not (tmp_path / ".cache").exists()  # refused before anything was built or written

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        plain = compose(config_name="train", overrides=["~experiment", f"paths.root_dir={tmp_path}"])
    assert plain.demo is None and plain.entry == TRAIN_ENTRY
    with pytest.raises(ConfigError, match=r"^demo: "):
        demo_settings(plain)


def test_demo_experiment_builds_on_meta():
    """What tests/test_configs.py checks for every experiment (dry run on the meta device)."""
    from t3.training.dry_run import build_dry_run

    cfg = compose_demo(Path("/nonexistent/t3-demo-root"), "dry_run=true")
    facts = validate(cfg)
    run = build_dry_run(cfg, facts)
    assert run.macs_t3.total <= run.macs_dense.total and run.num_trainable > 0


def _check_outputs(summary: dict[str, Any], out_dir: Path) -> None:
    rows = summary["results"]["rows"]
    assert [r["name"] for r in rows] == list(MODEL_NAMES)
    for row in rows:
        numbers = [row["heldout_loss"], row[FD_NAME], *row["latency_ms"].values()]
        numbers += list(row["heldout_loss_per_sigma"].values())
        assert all(math.isfinite(x) for x in numbers), row
    macs = summary["results"]["macs"]["eval"]
    assert macs["self_attention_ratio"] > 1
    # The control: T3 after vs dense after fine-tuning, beside the cost ratio.
    by_name = {row["name"]: row for row in rows}
    control = summary["results"]["control"]
    gap = control["quality"]["heldout_loss"]
    assert (
        gap["t3"] == by_name["t3_after_ft"]["heldout_loss"]
        and gap["dense"] == by_name["dense_after_ft"]["heldout_loss"]
    )
    assert gap["t3_minus_dense"] == pytest.approx(gap["t3"] - gap["dense"])
    assert control["cost"]["eval"]["self_attention_ratio"] == macs["self_attention_ratio"]
    for key in ("markdown", "json", "plot"):
        path = Path(summary["outputs"][key])
        assert path.parent == out_dir and path.is_file() and path.stat().st_size > 0
    assert any(p.endswith(".mp4") and Path(p).stat().st_size > 0 for p in summary["outputs"]["videos"])
    markdown = (out_dir / "results.md").read_text()
    assert all(MODEL_NAMES[name] in markdown for name in MODEL_NAMES)
    assert "Not I3D-FVD" in markdown and summary["control_table"] in markdown
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
    # Each fine-tune's own last validation used the same held-out set and noise as the comparison.
    assert first["results"]["num_heldout"] == 4
    rows = {row["name"]: row for row in first["results"]["rows"]}
    for attention in ("t3", "dense"):
        after = rows[f"{attention}_after_ft"]["heldout_loss"]
        assert first["finetune"][attention]["final_val_loss"] == pytest.approx(after, rel=1e-4)
    assert "T3 vs dense, both fine-tuned" in caplog.text

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

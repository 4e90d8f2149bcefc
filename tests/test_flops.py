"""MAC counts of `t3.attention.flops` against torch's FlopCounterMode, and the paper's 4K figures."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import t3
from t3.attention import WindowPlan, build_schedule, get_schedule, t3_attention
from t3.attention.flops import (
    dense_attention_macs,
    dit_macs,
    plan_attention_macs,
    schedule_attention_macs,
)
from t3.attention.plan import effective_branches
from t3.models.presets import dit_config, get_spec
from t3.models.tiny import TINY_DIT_CONFIG

WAN21 = dit_config("wan2.1-t2v-1.3b")
WAN22 = dit_config("wan2.2-ti2v-5b")

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = TINY_DIT_CONFIG  # 2 heads x 12, 5 layers, 4 latent channels, text_dim 16
TINY_GRID = (3, 4, 6)  # a [1, 4, 3, 8, 12] latent after (1, 2, 2) patches
# One period of 5 rules on TINY_GRID: a per-frame plan whose branches coincide, a padded plan
# ((2, 3, 4) pads 3x4x6 to 4x6x8), one token per group (coincide) and dense.
MIXED = ((3, 1, 1), (1, 2, 3), (3, 4, 6), (2, 3, 4), (1, 1, 1))


def counted_flops(fn, *args, **kwargs) -> int:
    """FLOPs FlopCounterMode sees for ``fn``.

    On CPU, SDPA dispatches to ``_scaled_dot_product_flash_attention_for_cpu``, which FlopCounterMode
    has no formula for (it would count 0); the math backend decomposes into counted ``bmm``s.
    """
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops()


# ---------------------------------------------------------------------------------------------------
# (a) the attention op


@pytest.mark.parametrize(
    ("grid", "pieces", "branches", "share"),
    [
        ((2, 4, 6), (1, 2, 3), ("local", "dilated"), True),  # divisible
        ((3, 5, 7), (2, 2, 3), ("local", "dilated"), True),  # padded on every axis
        ((3, 5, 7), (2, 2, 3), ("dilated",), True),
        ((3, 4, 6), (1, 3, 4), ("local",), True),  # padded h, w
        ((3, 4, 6), (3, 1, 1), ("local", "dilated"), True),  # per frame: branches coincide, shared
        ((3, 4, 6), (3, 1, 1), ("local", "dilated"), False),  # ... and computed twice
        ((2, 3, 4), (1, 1, 1), ("local", "dilated"), True),  # dense plan through the op
    ],
)
def test_t3_attention_flops_match_plan_attention_macs(grid, pieces, branches, share):
    heads, head_dim, batch = 2, 8, 2
    q, k, v = (torch.randn(batch, math.prod(grid), heads, head_dim) for _ in range(3))
    plan = WindowPlan(*pieces)
    computed = effective_branches(plan, grid, branches, share)
    flops = counted_flops(t3_attention, q, k, v, grid, plan, branches, "sdpa", share_identical=share)
    assert flops == 2 * batch * plan_attention_macs(grid, plan, computed, heads, head_dim)
    if pieces == (3, 1, 1):
        assert len(computed) == (1 if share else 2)


@pytest.mark.parametrize(("tokens", "kv_tokens"), [(10, None), (9, 7)])
def test_dense_sdpa_flops_match_dense_attention_macs(tokens, kv_tokens):
    heads, head_dim, batch = 3, 8, 2
    q = torch.randn(batch, heads, tokens, head_dim)
    kv = torch.randn(batch, heads, kv_tokens or tokens, head_dim)
    flops = counted_flops(F.scaled_dot_product_attention, q, kv, kv)
    assert flops == 2 * batch * dense_attention_macs(tokens, heads, head_dim, kv_tokens)


def test_dense_plan_costs_dense_attention():
    grid = (3, 5, 7)
    assert plan_attention_macs(grid, WindowPlan(1, 1, 1), ("local",), 4, 16) == dense_attention_macs(
        105, 4, 16
    )


def test_schedule_attention_macs_follows_the_schedule_or_the_override():
    grid = TINY_GRID
    sharing = build_schedule("mixed", pieces=MIXED)
    no_sharing = build_schedule("mixed", pieces=MIXED, share_identical_branches=False)
    both = schedule_attention_macs(sharing, grid, 5, 2, 12, share_identical=False)
    shared = schedule_attention_macs(sharing, grid, 5, 2, 12, share_identical=True)
    assert schedule_attention_macs(sharing, grid, 5, 2, 12) == shared
    assert schedule_attention_macs(no_sharing, grid, 5, 2, 12) == both
    assert schedule_attention_macs(no_sharing, grid, 5, 2, 12, share_identical=True) == shared
    # (3,1,1), (3,4,6) and (1,1,1) have coinciding branches: sharing halves exactly those layers.
    halved = sum(
        plan_attention_macs(grid, WindowPlan(*p), ("local",), 2, 12)
        for p in MIXED
        if p != (1, 2, 3) and p != (2, 3, 4)
    )
    assert both - shared == halved


# ---------------------------------------------------------------------------------------------------
# (b) a whole tiny Wan DiT


@pytest.fixture
def tiny_model() -> WanTransformer3DModel:
    torch.manual_seed(0)
    return WanTransformer3DModel(**TINY).eval()


def tiny_inputs(per_token_timestep: bool = False):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 3, 8, 12, generator=g)
    t = torch.full((1, math.prod(TINY_GRID)), 300.0) if per_token_timestep else torch.tensor([300.0])
    text = torch.randn(1, 7, 16, generator=g)
    return x, t, text


@torch.no_grad()
@pytest.mark.parametrize("per_token_timestep", [False, True])
def test_untransformed_dit_flops_match_dit_macs(tiny_model, per_token_timestep):
    x, t, text = tiny_inputs(per_token_timestep)
    flops = counted_flops(tiny_model, x, t, text)
    macs = dit_macs(tiny_model.config, TINY_GRID, text_tokens=7, per_token_timestep=per_token_timestep)
    assert flops == 2 * macs.total
    assert macs.attention == 5 * dense_attention_macs(72, 2, 12)
    assert macs == dit_macs(TINY, TINY_GRID, text_tokens=7, per_token_timestep=per_token_timestep)


@torch.no_grad()
@pytest.mark.parametrize("share", [True, False])
def test_transformed_dit_flops_match_dit_macs(tiny_model, share):
    schedule = build_schedule("mixed", pieces=MIXED, share_identical_branches=share)
    x, t, text = tiny_inputs()
    dense = dit_macs(TINY, TINY_GRID, text_tokens=7)
    t3.transform(tiny_model, schedule, backend="sdpa")
    flops = counted_flops(tiny_model, x, t, text)
    macs = dit_macs(TINY, TINY_GRID, text_tokens=7, schedule=schedule)
    assert flops == 2 * macs.total
    assert macs.attention == schedule_attention_macs(schedule, TINY_GRID, 5, 2, 12)
    # Only the self-attention term differs from the dense model.
    assert macs.total - macs.attention == dense.total - dense.attention
    assert dit_macs(TINY, TINY_GRID, text_tokens=7, schedule=schedule, share_identical=not share) != macs


@torch.no_grad()
def test_image_conditioned_dit_flops_match_dit_macs():
    # The I2V processor takes the last 512 context tokens as text, so the text has 512 tokens.
    config = dict(TINY, image_dim=8, added_kv_proj_dim=24)
    torch.manual_seed(0)
    model = WanTransformer3DModel(**config).eval()
    x, t, _ = tiny_inputs()
    text, image = torch.randn(1, 512, 16), torch.randn(1, 5, 8)
    flops = counted_flops(model, x, t, text, encoder_hidden_states_image=image)
    macs = dit_macs(config, TINY_GRID, text_tokens=512, image_tokens=5)
    assert flops == 2 * macs.total
    assert macs.image_embedding > 0


# ---------------------------------------------------------------------------------------------------
# (c) the paper's 4K figures


def attention_ratio(config, schedule_name: str, grid, share: bool | None) -> Fraction:
    heads, head_dim, layers = (
        config["num_attention_heads"],
        config["attention_head_dim"],
        config["num_layers"],
    )
    dense = layers * dense_attention_macs(math.prod(grid), heads, head_dim)
    t3_macs = schedule_attention_macs(
        get_schedule(schedule_name), grid, layers, heads, head_dim, share_identical=share
    )
    return Fraction(dense, t3_macs)


def test_wan21_4k_attention_reduction_matches_the_paper():
    grid = (21, 136, 240)
    both = attention_ratio(WAN21, "wan21_4k", grid, share=False)
    shared = attention_ratio(WAN21, "wan21_4k", grid, share=True)
    assert 42.5 < both < 43.5  # the paper's ~43x, both branches always computed
    assert both == Fraction(285600, 6641)  # 43.0056
    assert shared == Fraction(95200, 1307)  # 72.8386: layer 0 (21,1,1) computes one branch
    assert attention_ratio(WAN21, "wan21_4k", grid, share=None) == shared  # the preset shares


@pytest.mark.parametrize(
    ("config", "windows", "pieces", "grid"),
    [
        (WAN21, "wan21_windows", "wan21_4k", (21, 136, 240)),
        (WAN22, "wan22_windows", "wan22_4k", (21, 68, 120)),
    ],
)
def test_window_presets_cost_the_authors_plans_at_4k(config, windows, pieces, grid):
    for share in (False, True):
        by_window = dit_macs(config, grid, schedule=get_schedule(windows), share_identical=share)
        by_pieces = dit_macs(config, grid, schedule=get_schedule(pieces), share_identical=share)
        assert by_window == by_pieces


# ---------------------------------------------------------------------------------------------------
# (d) grids


def test_video_token_grid():
    assert get_spec("wan2.1-t2v-1.3b").video_token_grid(81, 2176, 3840) == (21, 136, 240)
    assert get_spec("wan2.2-ti2v-5b").video_token_grid(81, 2176, 3840) == (21, 68, 120)
    assert get_spec("wan2.1-t2v-1.3b").video_token_grid(81, 480, 832) == (21, 30, 52)
    assert get_spec("tiny").video_token_grid(9, 64, 96) == (3, 4, 6)


# ---------------------------------------------------------------------------------------------------
# the benchmark script


def test_efficiency_table_json(tmp_path, capsys, monkeypatch):
    path = REPO_ROOT / "benchmarks" / "efficiency_table.py"
    spec = importlib.util.spec_from_file_location("efficiency_table", path)
    module = importlib.util.module_from_spec(spec)
    # dataclasses resolve the script's annotations through sys.modules while the module executes.
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    assert module.main(["--json", "--out", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    keys = [
        "model",
        "height",
        "width",
        "frames",
        "tokens",
        "attn_macs_dense",
        "attn_macs_t3",
        "attn_macs_t3_shared",
        "dit_macs_dense",
        "dit_macs_t3",
        "dit_macs_t3_shared",
    ]
    assert len(rows) == 10
    for row in rows:
        assert list(row) == keys
        assert isinstance(row["model"], str)
        assert all(type(row[k]) is int for k in keys[1:])
        assert row["attn_macs_dense"] > row["attn_macs_t3"] > row["attn_macs_t3_shared"]
        assert row["dit_macs_dense"] > row["dit_macs_t3"] > row["dit_macs_t3_shared"]
    (row,) = [r for r in rows if r["model"].startswith("Wan2.1") and r["height"] == 2176]
    assert row["tokens"] == 21 * 136 * 240
    assert 42.5 < row["attn_macs_dense"] / row["attn_macs_t3"] < 43.5
    assert row["attn_macs_dense"] / row["attn_macs_t3_shared"] == pytest.approx(95200 / 1307)
    # Text-to-video feeds one timestep per video, Wan2.2-TI2V included: its time MLP runs once, not per token.
    (wan22,) = [r for r in rows if r["model"].startswith("Wan2.2") and r["height"] == 2176]
    config, grid = get_spec("wan2.2-ti2v-5b").dit_config, (21, 68, 120)
    assert wan22["dit_macs_dense"] == dit_macs(config, grid, text_tokens=512).total
    assert wan22["dit_macs_dense"] < dit_macs(config, grid, text_tokens=512, per_token_timestep=True).total
    table = (tmp_path / "efficiency_table.md").read_text()
    assert "is 100 DiT passes (50 steps x 2)" in table
    assert (tmp_path / "efficiency_table.md").read_text().count("| Wan2.") == 10
    assert len((tmp_path / "efficiency_table.csv").read_text().splitlines()) == 11


def test_attention_benchmark_runs_small_and_reports_consistent_ratios(tmp_path, monkeypatch):
    """The attention benchmark end to end on small sizes: tables, CSV and plot, ratios from its own columns."""
    import csv

    path = REPO_ROOT / "benchmarks" / "attention.py"
    spec = importlib.util.spec_from_file_location("attention_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    argv = ["--device", "cpu", "--max-tokens", "6000", "--heads", "1", "--head-dim", "8", "--repeats", "1"]
    rows = module.main([*argv, "--out", str(tmp_path)])
    assert [r["tokens"] for r in rows] == [1344, 2688, 5376]
    assert [r["branches_computed"] for r in rows] == [1, 2, 2]  # one window covers 21x8x8: shared
    for r in rows:
        assert r["efficiency"] == pytest.approx(r["dense_s"] / r["t3_s"] / r["flop_ratio"])
        assert r["vs_straightforward"] == pytest.approx(r["straightforward_s"] / r["t3_s"])
        assert r["t3_saved_mib"] < r["straightforward_saved_mib"]
        assert r["t3_train_s"] > 0 and r["straightforward_train_s"] > 0
    assert [r["flop_ratio"] for r in rows] == pytest.approx([1.0, 1.0, 2.0])
    text = (tmp_path / "attention_cpu.md").read_text()
    assert "measured on CPU" in text and "T3's MAC count alone implies 1.50" in text
    assert "over the grids where T3 computes both branches (2688-5376 tokens)" in text
    with open(tmp_path / "attention_cpu.csv", newline="") as f:
        assert [int(r["tokens"]) for r in csv.DictReader(f)] == [1344, 2688, 5376]
    assert (tmp_path / "attention_cpu.png").stat().st_size > 0
    assert module.fit_exponent([1, 2, 4], [3.0, 12.0, 48.0]) == pytest.approx(2.0)

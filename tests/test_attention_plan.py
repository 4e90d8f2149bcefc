"""WindowPlan and Schedule: geometry, validation messages, presets."""

from __future__ import annotations

import pytest

from t3.attention import (
    PRESETS,
    LayerRule,
    PlanError,
    WindowPlan,
    build_schedule,
    effective_branches,
    get_schedule,
    windows_from_pieces,
)
from t3.attention.schedule import WAN21_4K_GRID, WAN21_4K_PIECES, WAN22_4K_GRID, WAN22_4K_PIECES


def test_window_and_padding_geometry():
    plan = WindowPlan(2, 3, 4)
    assert plan.window((4, 9, 8)) == (2, 3, 2)
    assert not plan.needs_padding((4, 9, 8))
    assert plan.window((5, 7, 9)) == (3, 3, 3)
    assert plan.padded_grid((5, 7, 9)) == (6, 9, 12)
    assert plan.needs_padding((5, 7, 9))
    assert plan.num_groups == 24
    assert plan.group_size((5, 7, 9)) == 27


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_window_plan_rejects_non_positive_ints(bad):
    with pytest.raises(PlanError, match="n_t must be an int >= 1"):
        WindowPlan(bad, 1, 1)


def test_plan_larger_than_axis_names_layer_grid_and_plan():
    with pytest.raises(PlanError) as err:
        WindowPlan(1, 17, 30).check((21, 16, 240), layer=6)
    msg = str(err.value)
    assert "layer 6" in msg and "(1, 17, 30)" in msg and "(21, 16, 240)" in msg and "1 <= n_h <= 16" in msg


@pytest.mark.parametrize(
    ("pieces", "grid", "coincide"),
    [
        ((21, 1, 1), (21, 136, 240), True),  # whole frames in both partitions
        ((1, 1, 1), (4, 5, 6), True),  # dense
        ((4, 5, 6), (4, 5, 6), True),  # single tokens
        ((1, 17, 30), (21, 136, 240), False),
        ((3, 1, 1), (21, 8, 8), False),
        ((4, 1, 6), (4, 5, 6), True),
    ],
)
def test_branches_coincide(pieces, grid, coincide):
    plan = WindowPlan(*pieces)
    assert plan.branches_coincide(grid) is coincide
    computed = effective_branches(plan, grid, ("local", "dilated"))
    assert computed == (("local",) if coincide else ("local", "dilated"))
    assert effective_branches(plan, grid, ("dilated", "local"), share_identical=False) == ("local", "dilated")


def test_authors_presets_fit_their_4k_grids_and_match_the_paper():
    for name, pieces, grid in [
        ("wan21_4k", WAN21_4K_PIECES, WAN21_4K_GRID),
        ("wan22_4k", WAN22_4K_PIECES, WAN22_4K_GRID),
    ]:
        schedule = get_schedule(name)
        plans = schedule.plans(grid, 30)
        assert [lp.plan.pieces for lp in plans[:5]] == list(pieces)
        assert [lp.plan.pieces for lp in plans[5:10]] == list(pieces)  # period 5
        assert not any(lp.plan.needs_padding(grid) for lp in plans)
        # layer 0 keeps whole frames and is computed once; the others keep the whole time axis.
        assert plans[0].computed == ("local",)
        assert all(lp.plan.n_t == 1 for lp in plans[1:3])
    assert PRESETS["dense"].is_dense and not PRESETS["wan21_4k"].is_dense


def test_window_presets_reproduce_authors_plans_at_4k_and_adapt_to_720p():
    for windows_name, pieces_name, grid in [
        ("wan21_windows", "wan21_4k", WAN21_4K_GRID),
        ("wan22_windows", "wan22_4k", WAN22_4K_GRID),
    ]:
        by_windows = get_schedule(windows_name).plans(grid, 5)
        by_pieces = get_schedule(pieces_name).plans(grid, 5)
        assert [a.plan for a in by_windows] == [b.plan for b in by_pieces]
    # 720x1280x81 on Wan2.1: grid 21x45x80. Windows (None, 8, 8) -> pieces (1, ceil(45/8), 10).
    plans = get_schedule("wan21_windows").plans((21, 45, 80), 5)
    assert [lp.plan.pieces for lp in plans] == [(21, 1, 1), (1, 6, 10), (1, 3, 14), (3, 6, 3), (7, 3, 2)]
    # The authors' fixed pieces cannot apply at a small grid: the error names the layer.
    with pytest.raises(PlanError, match="layer 1"):
        get_schedule("wan21_4k").plans((21, 16, 16), 5)


def test_windows_from_pieces_requires_divisibility():
    assert windows_from_pieces([(21, 1, 1), (3, 17, 8)], (21, 136, 240)) == ((1, None, None), (7, 8, 30))
    with pytest.raises(PlanError, match="does not divide"):
        windows_from_pieces([(4, 1, 1)], (21, 8, 8))


def test_build_schedule_from_config_values_and_errors():
    s = build_schedule(
        "s", windows=[[None, 4, 4], [2, None, None]], branches=[["local"], ["local", "dilated"]]
    )
    assert s.period == 2
    assert s.layer_plan(3, (8, 8, 8)).plan.pieces == (4, 1, 1)
    assert s.layer_plan(2, (8, 8, 8)).branches == ("local",)
    with pytest.raises(ValueError, match="exactly one of 'pieces' or 'windows'"):
        build_schedule("s")
    with pytest.raises(ValueError, match="rule 1 must be a \\[t, h, w\\] triple"):
        build_schedule("s", pieces=[[1, 1, 1], [1, 2]])
    with pytest.raises(ValueError, match="rule 0: .*n_h must be an int >= 1"):
        build_schedule("s", pieces=[[1, 0, 1]])
    with pytest.raises(ValueError, match="'branches' has 1 entries but there are 2"):
        build_schedule("s", pieces=[[1, 1, 1], [1, 1, 1]], branches=[["local"]])
    with pytest.raises(ValueError, match="subset of"):
        LayerRule(pieces=(1, 1, 1), branches=("close",))
    with pytest.raises(KeyError, match="presets"):
        get_schedule("wan21_8k")


def test_describe_lists_every_layer():
    text = get_schedule("wan21_4k").describe(WAN21_4K_GRID)
    assert "685440 tokens" in text and text.count("layer") == 5 and "(1,17,30)" in text

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
from t3.attention.schedule import (
    WAN21_4K_GRID,
    WAN21_4K_PIECES,
    WAN21_720P_GRID,
    WAN21_WINDOWS,
    WAN22_4K_GRID,
    WAN22_4K_PIECES,
    WAN22_720P_GRID,
    WAN22_WINDOWS,
    MadeFor,
    Schedule,
    dividing_windows,
)


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
    # Fixed pieces that cannot apply at a small grid: the error names the layer.
    with pytest.raises(PlanError, match="layer 1"):
        build_schedule("fixed", pieces=WAN21_4K_PIECES).plans((21, 16, 16), 5)


@pytest.mark.parametrize(
    "name,grid,instead",
    [("wan21_4k", (21, 45, 80), "wan21_windows"), ("wan22_4k", (21, 22, 40), "wan22_windows")],
)
def test_fixed_piece_presets_refuse_other_grids_suggesting_the_window_preset(name, grid, instead):
    """wan21_4k at 720p used to run (1, 17, 30) with 3-row windows: every grid but its own is refused."""
    with pytest.raises(PlanError) as err:
        get_schedule(name).plans(grid, 30)
    assert str(err.value) == (
        f"schedule {name!r} fixes piece counts for the token grid {get_schedule(name).made_for.grid} only, got "
        f"{grid}; on other grids use {instead!r} (its windows as sizes)"
    )
    get_schedule(instead).plans(grid, 30)


def test_padding_report_counts_padded_slots_per_layer_and_overall():
    # wan21_windows at 720x1280x81 (grid 21x45x80, 75,600 tokens): layers 1-3 of each period pad.
    report = get_schedule("wan21_windows").padding_report(WAN21_720P_GRID, 30)
    assert report.tokens == 75_600
    # (1,6,10) pads rows to 48, (1,3,14) columns to 84, (3,6,3) rows to 48 and columns to 81.
    assert report.padded[:5] == (0, 21 * 48 * 80 - 75_600, 21 * 45 * 84 - 75_600, 21 * 48 * 81 - 75_600, 0)
    assert report.padded[:5] == (0, 5040, 3780, 6048, 0) and report.padded[5:10] == report.padded[:5]
    assert report.share(1) == pytest.approx(1 / 15) and report.share(3) == pytest.approx(0.08)
    assert report.overall == pytest.approx((5040 + 3780 + 6048) / (5 * 75_600))  # 3.9%
    assert str(report) == (
        "schedule wan21_windows on grid (21, 45, 80), 30 layers: padding 3.9% of the real tokens overall; "
        "plan (1,6,10) (window (21, 8, 8), 6 layers) pads 6.7%; plan (1,3,14) (window (21, 15, 6), 6 layers) "
        "pads 5.0%; plan (3,6,3) (window (7, 8, 27), 6 layers) pads 8.0%"
    )
    assert "padding 6.7%" in get_schedule("wan21_windows").describe(WAN21_720P_GRID)
    assert str(get_schedule("wan21_4k").padding_report(WAN21_4K_GRID, 30)).endswith(": no layer pads")


@pytest.mark.parametrize(
    "stage1,windows,grid,old",
    [("wan21_720p", WAN21_WINDOWS, WAN21_720P_GRID, "wan21_windows"), ("wan22_720p", WAN22_WINDOWS, WAN22_720P_GRID, "wan22_windows")],
)  # fmt: skip
def test_stage1_presets_divide_their_720p_grids_where_the_4k_windows_pad(stage1, windows, grid, old):
    schedule = get_schedule(stage1)
    assert [r.window for r in schedule.rules] == list(dividing_windows(windows, grid))
    assert not any(schedule.padding_report(grid, 30).padded)
    assert sum(lp > 0 for lp in get_schedule(old).padding_report(grid, 5).padded) == 3


def test_dividing_windows_takes_the_nearest_divisor_in_ratio():
    assert dividing_windows([(None, 8, 8), (None, 17, 6), (7, 8, 30), (3, 17, 40)], (21, 45, 80)) == (
        (None, 9, 8), (None, 15, 5), (7, 9, 40), (3, 15, 40)
    )  # fmt: skip
    # 17 rows of 22: 22 (the whole axis, ratio 1.29) is nearer than 11 (1.55).
    assert dividing_windows([(7, 17, 8)], (21, 22, 40)) == ((7, None, 8),)


def test_made_for_travels_with_the_schedule_but_changes_no_attention():
    schedule = get_schedule("wan21_4k")
    assert schedule.made_for == MadeFor(
        model="wan2.1-t2v-1.3b", grid=WAN21_4K_GRID, other_grids="wan21_windows"
    )
    again = Schedule.from_dict(schedule.as_dict())
    assert again.made_for == schedule.made_for and again == schedule
    assert build_schedule("wan21_4k", pieces=WAN21_4K_PIECES).same_attention(schedule)
    assert Schedule.from_dict({**schedule.as_dict(), "made_for": None}).made_for is None  # older records
    with pytest.raises(ValueError, match=r"made_for: unknown key\(s\) \['layers'\]"):
        build_schedule("s", pieces=[(1, 1, 1)], made_for={"layers": 30})


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
    assert "685440 tokens" in text and text.count("  layer ") == 5 and "(1,17,30)" in text
    assert text.endswith("padding: 0.0% of the real tokens over these 5 layers")


@pytest.mark.parametrize(
    "name,grid,overall,padding",
    [
        ("wan21_windows", (21, 44, 80), "5.8%", ["(1,6,10)", "(1,3,14)", "(3,6,3)", "(7,3,2)"]),
        ("wan22_windows", (21, 22, 40), "5.7%", ["(1,6,7)", "(1,6,2)", "(7,2,3)"]),
    ],
)
def test_the_readmes_720p_padding_figures(name, grid, overall, padding):
    """README "Schedules": which plans of the 4K windows pad at 704x1280, and how much overall."""
    text = str(get_schedule(name).padding_report(grid, 30))
    assert f"padding {overall} of the real tokens overall" in text
    assert [part.split()[1] for part in text.split("; ")[1:]] == padding

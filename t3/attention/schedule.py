"""Schedules: which window plan each layer of a DiT uses.

A schedule is a short cycle of `LayerRule`s; layer ``i`` uses rule ``i % period`` (the authors use a
period of 5). A rule gives either

- fixed piece counts ``(n_t, n_h, n_w)``: the authors' presets, tied to one grid; or
- window sizes ``(w_t, w_h, w_w)`` (``None`` = the whole axis), from which piece counts are derived
  for any grid as ``n = ceil(L / w)``: the same schedule then serves 480p, 720p, 1080p and 4K.

The window-size presets below are the authors' 4K plans rewritten as window sizes, so at the 4K grid
they give exactly the authors' piece counts, and at lower resolutions windows of the same size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from t3.attention.plan import (
    AXES,
    BRANCHES,
    Branch,
    Grid,
    PlanError,
    WindowPlan,
    check_branches,
    check_grid,
    effective_branches,
)

Window = tuple[int | None, int | None, int | None]


@dataclass(frozen=True)
class LayerRule:
    """One entry of a schedule's cycle: fixed ``pieces`` or ``window`` sizes, and the branches."""

    pieces: Grid | None = None
    window: Window | None = None
    branches: tuple[Branch, ...] = BRANCHES

    def __post_init__(self) -> None:
        if (self.pieces is None) == (self.window is None):
            raise ValueError(
                "a layer rule needs exactly one of pieces=(n_t, n_h, n_w) or window=(w_t, w_h, w_w)"
            )
        if self.pieces is not None:
            object.__setattr__(self, "pieces", WindowPlan(*self.pieces).pieces)
        if self.window is not None:
            window = tuple(self.window)
            if len(window) != 3 or any(
                w is not None and (not isinstance(w, int) or isinstance(w, bool) or w < 1) for w in window
            ):
                raise ValueError(f"window must be three ints >= 1 or null (whole axis), got {self.window!r}")
            object.__setattr__(self, "window", window)
        object.__setattr__(self, "branches", check_branches(self.branches))

    def plan(self, grid: Grid) -> WindowPlan:
        """The window plan this rule gives on ``grid``."""
        if self.pieces is not None:
            return WindowPlan(*self.pieces)
        assert self.window is not None
        grid = check_grid(grid)
        return WindowPlan(
            *(1 if w is None else math.ceil(length / w) for w, length in zip(self.window, grid, strict=True))
        )

    def __str__(self) -> str:
        shape = f"pieces {self.pieces}" if self.pieces is not None else f"window {self.window}"
        return f"{shape} {'+'.join(self.branches)}"


@dataclass(frozen=True)
class LayerPlan:
    """What one layer computes on one grid."""

    layer: int
    plan: WindowPlan
    branches: tuple[Branch, ...]  # as asked for
    computed: tuple[Branch, ...]  # after sharing identical branches


@dataclass(frozen=True)
class Schedule:
    """A cycle of layer rules; layer ``i`` uses ``rules[i % period]``."""

    name: str
    rules: tuple[LayerRule, ...]
    share_identical_branches: bool = True
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.rules:
            raise ValueError(f"schedule {self.name!r} has no layer rules")
        object.__setattr__(self, "rules", tuple(self.rules))

    @property
    def period(self) -> int:
        return len(self.rules)

    @property
    def is_dense(self) -> bool:
        """True when every layer keeps full attention on any grid."""
        return all(
            (r.pieces == (1, 1, 1)) or (r.window is not None and all(w is None for w in r.window))
            for r in self.rules
        )

    def layer_plan(self, layer: int, grid: Grid) -> LayerPlan:
        """The plan of ``layer`` on ``grid``; raises `PlanError` naming the layer if it cannot apply."""
        rule = self.rules[layer % self.period]
        plan = rule.plan(grid)
        plan.check(grid, layer=layer)
        computed = effective_branches(plan, grid, rule.branches, self.share_identical_branches)
        return LayerPlan(layer=layer, plan=plan, branches=rule.branches, computed=computed)

    def plans(self, grid: Grid, num_layers: int) -> list[LayerPlan]:
        """Plans of all layers on ``grid``: also the check that the schedule fits the grid."""
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        return [self.layer_plan(i, grid) for i in range(num_layers)]

    def same_attention(self, other: Schedule) -> bool:
        """True when ``other`` computes the same attention on every grid (same rules and sharing; the
        name and description may differ)."""
        return (self.rules, self.share_identical_branches) == (other.rules, other.share_identical_branches)

    def as_dict(self) -> dict[str, object]:
        """Plain JSON-able values, one entry per rule; `from_dict` rebuilds an equal schedule."""
        return {
            "name": self.name,
            "rules": [
                {
                    "pieces" if r.pieces is not None else "window": list(r.pieces or r.window or ()),
                    "branches": list(r.branches),
                }
                for r in self.rules
            ],
            "share_identical_branches": self.share_identical_branches,
            "description": self.description,
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Schedule:
        """The schedule `as_dict` wrote; a malformed entry raises ValueError naming it."""
        rules = data.get("rules")
        if not isinstance(data.get("name"), str) or not isinstance(rules, list) or not rules:
            raise ValueError("expected {name: str, rules: [non-empty list], ...}")
        built = []
        for i, rule in enumerate(rules):
            if not isinstance(rule, dict) or set(rule) - {"pieces", "window", "branches"}:
                raise ValueError(f"rule {i}: expected {{pieces | window, branches}}, got {rule!r}")
            try:
                built.append(
                    LayerRule(
                        pieces=None if rule.get("pieces") is None else tuple(rule["pieces"]),
                        window=None if rule.get("window") is None else tuple(rule["window"]),
                        branches=tuple(rule.get("branches", BRANCHES)),
                    )
                )
            except (TypeError, ValueError) as err:
                raise ValueError(f"rule {i}: {err}") from None
        return cls(
            name=str(data["name"]),
            rules=tuple(built),
            share_identical_branches=bool(data.get("share_identical_branches", True)),
            description=str(data.get("description", "")),
        )

    def describe(self, grid: Grid, num_layers: int | None = None) -> str:
        """A table of one period (or ``num_layers`` layers): plan, window, group size, branches."""
        grid = check_grid(grid)
        rows = [f"schedule {self.name} on grid {grid} ({math.prod(grid)} tokens):"]
        for lp in self.plans(grid, num_layers or self.period):
            window = lp.plan.window(grid)
            rows.append(
                f"  layer {lp.layer:>3}: plan {str(lp.plan):<12} window {str(window):<14} "
                f"{lp.plan.num_groups:>6} groups x {math.prod(window):>7} tokens, computed {'+'.join(lp.computed)}"
            )
        return "\n".join(rows)


def _rules(
    pieces: Sequence[Sequence[int]] | None,
    windows: Sequence[Sequence[int | None]] | None,
    branches: Sequence[str] | Sequence[Sequence[str]],
) -> tuple[LayerRule, ...]:
    if (pieces is None) == (windows is None):
        raise ValueError(
            "schedule config needs exactly one of 'pieces' or 'windows' (a list of [t, h, w] triples)"
        )
    entries = list(pieces if pieces is not None else windows)  # type: ignore[arg-type]
    if not entries:
        raise ValueError("schedule config: 'pieces'/'windows' must list at least one [t, h, w] triple")
    branches = list(branches)
    if branches and all(isinstance(b, str) for b in branches):
        per_rule = [tuple(branches)] * len(entries)
    else:
        per_rule = [tuple(b) for b in branches]
        if len(per_rule) != len(entries):
            raise ValueError(
                f"schedule config: 'branches' has {len(per_rule)} entries but there are {len(entries)} layer rules"
            )
    rules = []
    for i, (entry, br) in enumerate(zip(entries, per_rule, strict=True)):
        triple = tuple(entry)
        if len(triple) != 3:
            raise ValueError(f"schedule config: rule {i} must be a [t, h, w] triple, got {list(entry)}")
        try:
            if pieces is not None:
                rules.append(LayerRule(pieces=triple, branches=br))  # type: ignore[arg-type]
            else:
                rules.append(LayerRule(window=triple, branches=br))  # type: ignore[arg-type]
        except (ValueError, TypeError) as err:
            raise ValueError(f"schedule config: rule {i}: {err}") from None
    return tuple(rules)


def build_schedule(
    name: str,
    pieces: Sequence[Sequence[int]] | None = None,
    windows: Sequence[Sequence[int | None]] | None = None,
    branches: Sequence[str] | Sequence[Sequence[str]] = BRANCHES,
    share_identical_branches: bool = True,
    description: str = "",
) -> Schedule:
    """Build a schedule from plain values (the Hydra ``_target_`` of ``conf/t3/*.yaml``).

    ``branches`` is one list for all rules (``[local, dilated]``) or one list per rule.
    """
    return Schedule(
        name=name,
        rules=_rules(pieces, windows, branches),
        share_identical_branches=bool(share_identical_branches),
        description=description,
    )


# The authors' 4K piece counts (Wan2.1-1.3B: grid 21x136x240; Wan2.2-5B: grid 21x68x120).
WAN21_4K_PIECES = ((21, 1, 1), (1, 17, 30), (1, 8, 40), (3, 17, 8), (7, 8, 6))
WAN22_4K_PIECES = ((21, 1, 1), (1, 17, 20), (1, 17, 6), (3, 4, 15), (7, 4, 8))
WAN21_4K_GRID: Grid = (21, 136, 240)
WAN22_4K_GRID: Grid = (21, 68, 120)


def windows_from_pieces(pieces: Sequence[Sequence[int]], grid: Grid) -> tuple[Window, ...]:
    """Rewrite piece counts valid on ``grid`` as window sizes (``None`` where an axis is not cut).

    Raises if a piece count does not divide its axis, since the window size would be ambiguous.
    """
    grid = check_grid(grid)
    out = []
    for triple in pieces:
        window = []
        for axis, n, length in zip(AXES, triple, grid, strict=True):
            if length % n:
                raise PlanError(
                    f"n_{axis}={n} does not divide the {axis} axis length {length} of grid {grid}"
                )
            window.append(None if n == 1 else length // n)
        out.append(tuple(window))
    return tuple(out)  # type: ignore[return-value]


PRESETS: dict[str, Schedule] = {
    "dense": build_schedule(
        "dense", pieces=[(1, 1, 1)], description="full attention in every layer (baseline)"
    ),
    "wan21_4k": build_schedule(
        "wan21_4k", pieces=WAN21_4K_PIECES, description="authors' Wan2.1-T2V-1.3B 4K plans (grid 21x136x240)"
    ),
    "wan22_4k": build_schedule(
        "wan22_4k", pieces=WAN22_4K_PIECES, description="authors' Wan2.2-TI2V-5B 4K plans (grid 21x68x120)"
    ),
    "wan21_windows": build_schedule(
        "wan21_windows",
        windows=windows_from_pieces(WAN21_4K_PIECES, WAN21_4K_GRID),
        description="wan21_4k as window sizes: the authors' windows at any resolution",
    ),
    "wan22_windows": build_schedule(
        "wan22_windows",
        windows=windows_from_pieces(WAN22_4K_PIECES, WAN22_4K_GRID),
        description="wan22_4k as window sizes: the authors' windows at any resolution",
    ),
}


def get_schedule(name: str) -> Schedule:
    """A preset schedule by name."""
    if name not in PRESETS:
        raise KeyError(f"unknown T3 schedule {name!r}; presets: {sorted(PRESETS)}")
    return PRESETS[name]

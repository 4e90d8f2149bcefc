"""Schedules: which window plan each layer of a DiT uses.

A schedule is a short cycle of `LayerRule`s; layer ``i`` uses rule ``i % period`` (the authors use a
period of 5). A rule gives either

- fixed piece counts ``(n_t, n_h, n_w)``: the authors' presets, tied to one grid; or
- window sizes ``(w_t, w_h, w_w)`` (``None`` = the whole axis), from which piece counts are derived
  for any grid as ``n = ceil(L / w)``: the same schedule then serves 480p, 720p, 1080p and 4K.

The window-size presets below are the authors' 4K plans rewritten as window sizes, so at the 4K grid
they give exactly the authors' piece counts, and at lower resolutions windows of the same size. A window
that does not divide its axis pads it (padded slots are masked, but computed): `Schedule.padding_report`
counts them, and the stage-1 presets (``wan21_720p``, ``wan22_720p``) choose windows that divide the
720p grids, so no layer pads there.

A schedule says what it was made for (`MadeFor`): the authors' fixed piece counts fit one model and one
grid and refuse any other grid; window sizes count tokens, so they keep their meaning only on models
whose tokens cover the same video extent. `t3.models.ModelSpec.check_schedule` holds a model to it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
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
class MadeFor:
    """What a schedule was made for; a field left None means any.

    Attributes:
        model: The model preset (``t3.models`` name) whose layout, layers, heads, patch size and VAE
            stride, the schedule was made for; a model of another layout is refused.
        token_size: Frames x pixels x pixels one token covers (VAE stride x patch size). Window sizes
            count tokens, so they cover the same video extent only on models with this token size.
        grid: The one token grid the schedule's fixed piece counts were chosen for; others are refused.
        other_grids: The schedule to use on other grids (named when a grid is refused).
    """

    model: str | None = None
    token_size: Grid | None = None
    grid: Grid | None = None
    other_grids: str | None = None

    def __post_init__(self) -> None:
        for key in ("token_size", "grid"):
            value = getattr(self, key)
            if value is not None:
                object.__setattr__(self, key, check_grid(tuple(value)))

    def as_dict(self) -> dict[str, object]:
        """The fields that are set, as plain values (`from_dict` reads them back)."""
        return {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in (
                ("model", self.model),
                ("token_size", self.token_size),
                ("grid", self.grid),
                ("other_grids", self.other_grids),
            )
            if value is not None
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object] | None) -> MadeFor | None:
        """``made_for`` of a schedule config or record; None stays None (made for any model and grid)."""
        if data is None:
            return None
        unknown = set(data) - {"model", "token_size", "grid", "other_grids"}
        if unknown:
            raise ValueError(
                f"made_for: unknown key(s) {sorted(unknown)}; accepted: model, token_size, grid, other_grids"
            )
        return cls(**data)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Padding:
    """The padded slots a schedule computes on one grid: per layer and overall.

    A layer whose window does not divide an axis pads the grid to ``pieces x window`` on that axis; both
    partitions then hold the padded grid's slots, of which ``padded[i]`` are padding (masked keys, dropped
    queries: no effect on the output, only work).
    """

    schedule: str
    grid: Grid
    layers: tuple[LayerPlan, ...]
    padded: tuple[int, ...]  # padded slots per layer

    @property
    def tokens(self) -> int:
        """Real tokens of the grid (per layer)."""
        return math.prod(self.grid)

    def share(self, layer: int) -> float:
        """Padded slots of ``layer`` over the real tokens."""
        return self.padded[layer] / self.tokens

    @property
    def overall(self) -> float:
        """Padded slots of all layers over their real tokens."""
        return sum(self.padded) / (self.tokens * len(self.padded))

    def __str__(self) -> str:
        head = f"schedule {self.schedule} on grid {self.grid}, {len(self.layers)} layers"
        if not any(self.padded):
            return f"{head}: no layer pads"
        layers_of: dict[WindowPlan, list[int]] = {}
        for lp in self.layers:
            if self.padded[lp.layer]:
                layers_of.setdefault(lp.plan, []).append(lp.layer)
        padding = "; ".join(
            f"plan {plan} (window {plan.window(self.grid)}, {len(layers)} layers) pads "
            f"{self.padded[layers[0]] / self.tokens:.1%}"
            for plan, layers in layers_of.items()
        )
        return f"{head}: padding {self.overall:.1%} of the real tokens overall; {padding}"


@dataclass(frozen=True)
class Schedule:
    """A cycle of layer rules; layer ``i`` uses ``rules[i % period]``.

    ``made_for`` says which models and grids the schedule was made for (`MadeFor`; None: any). It does
    not change what is computed, so two schedules that differ only in it compute the same attention.
    """

    name: str
    rules: tuple[LayerRule, ...]
    share_identical_branches: bool = True
    description: str = field(default="", compare=False)
    made_for: MadeFor | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not self.rules:
            raise ValueError(f"schedule {self.name!r} has no layer rules")
        object.__setattr__(self, "rules", tuple(self.rules))

    def check_fixed_grid(self, grid: Grid) -> None:
        """Raise `PlanError` if the schedule was made for one grid and ``grid`` is another."""
        if self.made_for is None or self.made_for.grid is None or tuple(grid) == self.made_for.grid:
            return
        instead = self.made_for.other_grids
        raise PlanError(
            f"schedule {self.name!r} fixes piece counts for the token grid {self.made_for.grid} only, got "
            f"{tuple(grid)}" + (f"; on other grids use {instead!r} (its windows as sizes)" if instead else "")
        )

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
        """The plan of ``layer`` on ``grid``; raises `PlanError` naming the layer if it cannot apply (or
        naming the grid the schedule was made for, see `check_fixed_grid`)."""
        self.check_fixed_grid(grid)
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

    def padding_report(self, grid: Grid, num_layers: int) -> Padding:
        """The padded slots of each of ``num_layers`` layers on ``grid`` (see `Padding`)."""
        grid = check_grid(grid)
        plans = tuple(self.plans(grid, num_layers))
        padded = tuple(math.prod(lp.plan.padded_grid(grid)) - math.prod(grid) for lp in plans)
        return Padding(schedule=self.name, grid=grid, layers=plans, padded=padded)

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
            **({"made_for": self.made_for.as_dict()} if self.made_for is not None else {}),
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
            made_for=MadeFor.from_dict(data.get("made_for")),  # type: ignore[arg-type]
        )

    def describe(self, grid: Grid, num_layers: int | None = None) -> str:
        """A table of one period (or ``num_layers`` layers): plan, window, group size, branches, padding;
        then the padding share of the layers shown (one period: the share of the whole cycle)."""
        grid = check_grid(grid)
        padding = self.padding_report(grid, num_layers or self.period)
        rows = [f"schedule {self.name} on grid {grid} ({math.prod(grid)} tokens):"]
        for lp in padding.layers:
            window = lp.plan.window(grid)
            rows.append(
                f"  layer {lp.layer:>3}: plan {str(lp.plan):<12} window {str(window):<14} "
                f"{lp.plan.num_groups:>6} groups x {math.prod(window):>7} tokens, computed {'+'.join(lp.computed)}, "
                f"padding {padding.share(lp.layer):.1%}"
            )
        rows.append(
            f"  padding: {padding.overall:.1%} of the real tokens over these {len(padding.layers)} layers"
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
    made_for: Mapping[str, object] | None = None,
) -> Schedule:
    """Build a schedule from plain values (the Hydra ``_target_`` of ``conf/t3/*.yaml``).

    ``branches`` is one list for all rules (``[local, dilated]``) or one list per rule; ``made_for`` the
    fields of `MadeFor` that apply (None: any model and grid).
    """
    try:
        target = MadeFor.from_dict(made_for)
    except (TypeError, ValueError) as err:
        raise ValueError(f"schedule config: made_for: {err}") from None
    return Schedule(
        name=name,
        rules=_rules(pieces, windows, branches),
        share_identical_branches=bool(share_identical_branches),
        description=description,
        made_for=target,
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


def dividing_windows(windows: Sequence[Window], grid: Grid) -> tuple[Window, ...]:
    """Windows of about the same sizes that cut ``grid`` without padding.

    Each side becomes the divisor of its axis nearest to it in ratio (of two as near, the larger);
    ``None`` (the whole axis) stays, and so does a side the whole axis is nearest to.
    """
    grid = check_grid(grid)

    def side(w: int | None, length: int) -> int | None:
        if w is None:
            return None
        divisors = [d for d in range(1, length + 1) if length % d == 0]
        best = min(divisors, key=lambda d: (abs(math.log(d / w)), -d))
        return None if best == length else best

    return tuple(
        tuple(side(w, length) for w, length in zip(window, grid, strict=True))  # type: ignore[misc]
        for window in windows
    )


# Stage 1 (720P) grids: Wan2.1 at 720x1280x81 (its VAE 8x, patch 2) and Wan2.2 at 704x1280x81 (VAE 16x,
# patch 2; 720 is not a multiple of 32). Both 4K window sets pad there (see the README), these do not.
WAN21_720P_GRID: Grid = (21, 45, 80)
WAN22_720P_GRID: Grid = (21, 22, 40)
# Frames x pixels x pixels per token (VAE stride x patch size): what window sizes are counted in.
WAN21_TOKEN: Grid = (4, 16, 16)
WAN22_TOKEN: Grid = (4, 32, 32)
WAN21_WINDOWS = windows_from_pieces(WAN21_4K_PIECES, WAN21_4K_GRID)
WAN22_WINDOWS = windows_from_pieces(WAN22_4K_PIECES, WAN22_4K_GRID)

PRESETS: dict[str, Schedule] = {
    "dense": build_schedule(
        "dense", pieces=[(1, 1, 1)], description="full attention in every layer (baseline)"
    ),
    "wan21_4k": build_schedule(
        "wan21_4k",
        pieces=WAN21_4K_PIECES,
        description="authors' Wan2.1-T2V-1.3B 4K plans (grid 21x136x240)",
        made_for={"model": "wan2.1-t2v-1.3b", "grid": WAN21_4K_GRID, "other_grids": "wan21_windows"},
    ),
    "wan22_4k": build_schedule(
        "wan22_4k",
        pieces=WAN22_4K_PIECES,
        description="authors' Wan2.2-TI2V-5B 4K plans (grid 21x68x120)",
        made_for={"model": "wan2.2-ti2v-5b", "grid": WAN22_4K_GRID, "other_grids": "wan22_windows"},
    ),
    "wan21_windows": build_schedule(
        "wan21_windows",
        windows=WAN21_WINDOWS,
        description="wan21_4k as window sizes: the authors' windows at any resolution",
        made_for={"token_size": WAN21_TOKEN},
    ),
    "wan22_windows": build_schedule(
        "wan22_windows",
        windows=WAN22_WINDOWS,
        description="wan22_4k as window sizes: the authors' windows at any resolution",
        made_for={"token_size": WAN22_TOKEN},
    ),
    "wan21_720p": build_schedule(
        "wan21_720p",
        windows=dividing_windows(WAN21_WINDOWS, WAN21_720P_GRID),
        description="wan21_windows resized to divide the 720x1280x81 grid 21x45x80 (stage 1, no padding)",
        made_for={"token_size": WAN21_TOKEN},
    ),
    "wan22_720p": build_schedule(
        "wan22_720p",
        windows=dividing_windows(WAN22_WINDOWS, WAN22_720P_GRID),
        description="wan22_windows resized to divide the 704x1280x81 grid 21x22x40 (stage 1, no padding)",
        made_for={"token_size": WAN22_TOKEN},
    ),
}


def get_schedule(name: str) -> Schedule:
    """A preset schedule by name."""
    if name not in PRESETS:
        raise KeyError(f"unknown T3 schedule {name!r}; presets: {sorted(PRESETS)}")
    return PRESETS[name]

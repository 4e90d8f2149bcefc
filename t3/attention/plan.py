"""Window plans: how one layer cuts the (T, H, W) token grid into local and dilated groups.

Vocabulary used throughout `t3.attention`:

- grid: ``(T, H, W)`` tokens after patchify, flattened in t, h, w order (row-major).
- plan: ``WindowPlan(n_t, n_h, n_w)``, the number of pieces each axis is cut into.
- window: ``(w_t, w_h, w_w) = ceil(grid / pieces)``, tokens per piece along each axis.
- local partition: contiguous blocks; token ``(t, h, w)`` is in block ``(t // w_t, h // w_h, w // w_w)``.
- dilated partition: strided groups; token ``(t, h, w)`` is in group ``(t % n_t, h % n_h, w % n_w)``.

Both partitions have ``n_t * n_h * n_w`` groups of ``w_t * w_h * w_w`` slots. When an axis length is
not divisible by its piece count the axis is padded to ``n * w``; padded slots are masked as keys and
dropped as queries, so the result equals dense attention masked to each group's real tokens.

Semantics follow the T3 paper (arXiv 2512.13492) and the authors' released inference code, with the
branches named for what they are (``local``/``dilated``) instead of the authors' ``close``/``remote``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Grid = tuple[int, int, int]
Branch = Literal["local", "dilated"]
BRANCHES: tuple[Branch, Branch] = ("local", "dilated")
AXES = ("t", "h", "w")


class PlanError(ValueError):
    """A window plan that cannot apply to a grid (the message names the layer, grid and plan)."""


def check_grid(grid: Grid) -> Grid:
    """Validate and normalise a token grid ``(T, H, W)`` of positive ints."""
    if len(grid) != 3 or any(int(n) != n or n < 1 for n in grid):
        raise ValueError(f"grid must be three positive ints (T, H, W), got {tuple(grid)}")
    return (int(grid[0]), int(grid[1]), int(grid[2]))


def check_branches(branches: tuple[str, ...] | list[str]) -> tuple[Branch, ...]:
    """Validate a branch selection: a non-empty subset of ``("local", "dilated")`` without repeats."""
    branches = tuple(branches)
    if not branches or len(set(branches)) != len(branches) or not set(branches) <= set(BRANCHES):
        raise ValueError(f"branches must be a non-empty subset of {BRANCHES} without repeats, got {branches}")
    # Canonical order so that caches and sharing decisions do not depend on how the user spelled it.
    return tuple(b for b in BRANCHES if b in branches)  # type: ignore[return-value]


@dataclass(frozen=True)
class WindowPlan:
    """Pieces per axis of the token grid for one layer: ``(n_t, n_h, n_w)``.

    ``WindowPlan(1, 1, 1)`` is dense attention. ``WindowPlan(T, 1, 1)`` is full attention within
    each frame (both partitions are whole frames). A plan with ``n_t == 1`` keeps the whole time axis
    in every window ("axis-preserving").
    """

    n_t: int
    n_h: int
    n_w: int

    def __post_init__(self) -> None:
        for axis, n in zip(AXES, self.pieces, strict=True):
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise PlanError(f"WindowPlan n_{axis} must be an int >= 1, got {n!r}")

    @property
    def pieces(self) -> Grid:
        return (self.n_t, self.n_h, self.n_w)

    @property
    def num_groups(self) -> int:
        """Groups per partition (the same for local and dilated)."""
        return self.n_t * self.n_h * self.n_w

    def check(self, grid: Grid, layer: int | None = None) -> None:
        """Raise `PlanError` if a piece count exceeds its axis length."""
        grid = check_grid(grid)
        for axis, n, length in zip(AXES, self.pieces, grid, strict=True):
            if n > length:
                where = f"layer {layer}: " if layer is not None else ""
                raise PlanError(
                    f"{where}plan {self.pieces} cannot apply to grid {grid}: n_{axis}={n} exceeds the "
                    f"{axis} axis length {length} (accepted: 1 <= n_{axis} <= {length})"
                )

    def window(self, grid: Grid) -> Grid:
        """Window length per axis, ``ceil(L / n)`` (the padded piece size)."""
        self.check(grid)
        return tuple(math.ceil(length / n) for length, n in zip(grid, self.pieces, strict=True))  # type: ignore[return-value]

    def group_size(self, grid: Grid) -> int:
        """Slots per group, padding included: ``w_t * w_h * w_w``."""
        return math.prod(self.window(grid))

    def padded_grid(self, grid: Grid) -> Grid:
        return tuple(n * w for n, w in zip(self.pieces, self.window(grid), strict=True))  # type: ignore[return-value]

    def needs_padding(self, grid: Grid) -> bool:
        return self.padded_grid(grid) != check_grid(grid)

    def branches_coincide(self, grid: Grid) -> bool:
        """True when the local and dilated partitions are the same set partition of the grid.

        Per axis the two agree exactly when ``n == 1`` (both span the axis) or ``n == L`` (both
        are single indices); on any other axis a local block holds neighbours ``i, i + 1`` that
        fall into different dilated groups.
        """
        grid = check_grid(grid)
        self.check(grid)
        return all(n in (1, length) for n, length in zip(self.pieces, grid, strict=True))

    def __str__(self) -> str:
        return f"({self.n_t},{self.n_h},{self.n_w})"


DENSE_PLAN = WindowPlan(1, 1, 1)


def effective_branches(
    plan: WindowPlan, grid: Grid, branches: tuple[str, ...] | list[str], share_identical: bool = True
) -> tuple[Branch, ...]:
    """The branches that must actually be computed for ``plan`` on ``grid``.

    When both branches are asked for but the partitions coincide, their outputs are identical and the
    mean equals either one: compute ``local`` only (same output, half the work).
    """
    branches = check_branches(branches)
    if share_identical and len(branches) == 2 and plan.branches_coincide(grid):
        return ("local",)
    return branches

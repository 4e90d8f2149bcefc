"""Draw which tokens one query attends to in each branch of a window plan (a PNG).

    python -m t3.attention.viz --grid 21 136 240 --schedule wan21_4k --out docs/window_patterns_wan21_4k.png
    python -m t3.attention.viz --grid 21 45 80 --plan 3 6 10 --query 10 20 40 --out plan.png

Each row is one branch of one layer; each column one latent frame around the query's frame, showing
the H x W token grid with the attended tokens lit and the query marked. The strip on the left marks
every frame (of all T) that holds attended tokens.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from t3.attention.index import group_ids
from t3.attention.plan import Grid, WindowPlan, check_grid, effective_branches
from t3.attention.schedule import get_schedule
from t3.io import atomic_path

logger = logging.getLogger(__name__)


def attended(grid: Grid, plan: WindowPlan, branch: str, query: Grid) -> torch.Tensor:
    """``[T, H, W]`` boolean map of the tokens that ``query`` attends to in ``branch``."""
    T, H, W = grid
    ids = group_ids(grid, plan, branch).view(T, H, W)  # type: ignore[arg-type]
    return ids == ids[query]


def draw(
    grid: Grid,
    layers: list[tuple[str, WindowPlan]],
    query: Grid,
    path: Path,
    num_frames_shown: int = 7,
    title: str = "",
) -> Path:
    """Render the attended-token maps of ``layers`` (label, plan) for ``query`` to a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    grid = check_grid(grid)
    T, H, W = grid
    if not all(0 <= q < n for q, n in zip(query, grid, strict=True)):
        raise ValueError(
            f"query {query} is outside grid {grid} (accepted: 0 <= t < {T}, 0 <= h < {H}, 0 <= w < {W})"
        )
    half = num_frames_shown // 2
    first = max(0, min(query[0] - half, T - num_frames_shown))
    frames = list(range(first, min(T, first + num_frames_shown)))
    rows = [(label, plan, branch) for label, plan in layers for branch in ("local", "dilated")]
    cmap = ListedColormap(["#eeeeee", "#3465a4"])
    aspect = H / W
    fig, axes = plt.subplots(
        len(rows),
        len(frames) + 1,
        figsize=(1.0 + 1.6 * len(frames), 0.35 + 1.6 * aspect * len(rows) + 0.4),
        gridspec_kw={"width_ratios": [0.25] + [1] * len(frames)},
        squeeze=False,
    )
    for r, (label, plan, branch) in enumerate(rows):
        mask = attended(grid, plan, branch, query)
        shared = effective_branches(plan, grid, ("local", "dilated")) == ("local",)
        strip = axes[r][0]
        strip.imshow(mask.any(dim=(1, 2)).view(T, 1).numpy(), cmap=cmap, vmin=0, vmax=1, aspect="auto")
        strip.set_xticks([])
        strip.set_yticks([0, T - 1])
        strip.tick_params(labelsize=6)
        note = " (= local, computed once)" if shared and branch == "dilated" else ""
        strip.set_ylabel(
            f"{label}\n{branch}{note}\n{int(mask.sum())} keys",
            fontsize=6.5,
            rotation=0,
            ha="right",
            va="center",
        )
        for c, t in enumerate(frames):
            ax = axes[r][c + 1]
            frame = mask[t]
            if 0 < int(frame.sum()) <= frame.numel() // 8:
                # Sparse (dilated) groups: draw each token as a marker so single tokens stay visible.
                ax.imshow(torch.zeros_like(frame).numpy(), cmap=cmap, vmin=0, vmax=1)
                hs, ws = frame.nonzero(as_tuple=True)
                ax.scatter(ws.numpy(), hs.numpy(), s=1.2, marker="s", color="#3465a4", linewidths=0)
            else:
                ax.imshow(frame.numpy(), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            if t == query[0]:
                ax.plot(query[2], query[1], "o", color="#cc0000", markersize=2.5, zorder=3)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"t={t}", fontsize=7)
    fig.suptitle(title or f"grid {grid}, query {query}", fontsize=8)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=130, format="png")
    finally:
        plt.close(fig)
    logger.info("wrote %s", path)
    return path


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--grid", type=int, nargs=3, required=True, metavar=("T", "H", "W"))
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--plan", type=int, nargs=3, metavar=("N_T", "N_H", "N_W"))
    which.add_argument("--schedule", help="preset name: one period of its layers is drawn")
    parser.add_argument(
        "--query", type=int, nargs=3, metavar=("T", "H", "W"), help="default: the grid's centre"
    )
    parser.add_argument("--frames", type=int, default=7, help="frames shown around the query's frame")
    parser.add_argument("--out", type=Path, default=Path("outputs/window_patterns.png"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    grid = check_grid(tuple(args.grid))
    query = tuple(args.query) if args.query else tuple(n // 2 for n in grid)
    if args.plan:
        plan = WindowPlan(*args.plan)
        plan.check(grid)
        layers = [(f"plan {plan}", plan)]
        title = f"plan {plan} on grid {grid}, query {query}"
    else:
        schedule = get_schedule(args.schedule)
        layers = [(f"layer {lp.layer}: {lp.plan}", lp.plan) for lp in schedule.plans(grid, schedule.period)]
        title = f"schedule {schedule.name} on grid {grid}, query {query}: attended tokens per branch"
    return draw(grid, layers, query, args.out, args.frames, title)  # type: ignore[arg-type]


if __name__ == "__main__":
    main()

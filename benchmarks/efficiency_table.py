"""Attention and whole-DiT multiply-accumulates of dense vs T3 attention, per DiT forward.

Usage::

    python benchmarks/efficiency_table.py            # Markdown table on stdout
    python benchmarks/efficiency_table.py --json     # one JSON object per row on stdout
    python benchmarks/efficiency_table.py --out DIR  # where efficiency_table.{md,csv} go

Counts are exact (see `t3.attention.flops`) and need no GPU or weights: Wan2.1-T2V-1.3B and
Wan2.2-TI2V-5B at 480p to 4K, 81 frames, batch 1, 512 text tokens, all 30 layers. They count what
text-to-video generation runs: one timestep per video for both models (Wan2.2-TI2V's per-token timesteps
only matter for image-to-video, where the first frame is held at t = 0; `t3.generate` feeds one per video, as
the authors' DiffSynth pipeline does without an input image), so the time embedding runs once per video.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from t3.attention.flops import MacBreakdown, dit_macs
from t3.attention.plan import Grid
from t3.attention.schedule import Schedule, get_schedule
from t3.io import write_text_atomic
from t3.models.presets import get_spec

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
FRAMES = 81
TEXT_TOKENS = 512
STEPS = 50  # the authors' protocol: 50 sampler steps with classifier-free guidance
CFG_PASSES = 2  # conditional + unconditional DiT pass per step
RESOLUTIONS: tuple[tuple[str, int, int], ...] = (
    ("480p", 480, 832),
    ("720p", 720, 1280),  # snapped down to 704x1280 for Wan2.2 (VAE x patch stride 32), as its pipeline does
    ("1080p", 1088, 1920),  # 1080 is not a multiple of the VAE x patch stride (16 or 32)
    ("2K", 1440, 2560),
    ("4K", 2176, 3840),
)
JSON_KEYS = (
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
)


@dataclass(frozen=True)
class ModelEntry:
    """A model of the table: its preset (DiT config, VAE stride) and the T3 schedules that go with it."""

    name: str
    preset: str  # t3.models.presets name
    schedule: str  # window-size preset, used at every resolution
    schedule_4k: str  # the authors' fixed-piece preset it reproduces at 4K

    @property
    def config(self) -> dict[str, Any]:
        return get_spec(self.preset).dit_config


MODELS: tuple[ModelEntry, ...] = (
    ModelEntry("Wan2.1-T2V-1.3B", "wan2.1-t2v-1.3b", "wan21_windows", "wan21_4k"),
    ModelEntry("Wan2.2-TI2V-5B", "wan2.2-ti2v-5b", "wan22_windows", "wan22_4k"),
)


def count(entry: ModelEntry, grid: Grid, schedule: Schedule | None, share: bool | None) -> MacBreakdown:
    """MACs of one forward of ``entry`` on ``grid``: dense (``schedule=None``) or T3."""
    return dit_macs(entry.config, grid, text_tokens=TEXT_TOKENS, schedule=schedule, share_identical=share)


def table_rows() -> list[dict[str, Any]]:
    """One row per model and resolution with the `JSON_KEYS` plus ``label`` and ``grid``."""
    rows = []
    for entry in MODELS:
        schedule = get_schedule(entry.schedule)
        multiple = get_spec(entry.preset).pixel_multiple
        for label, height, width in RESOLUTIONS:
            height, width = height // multiple * multiple, width // multiple * multiple
            grid = get_spec(entry.preset).video_token_grid(FRAMES, height, width)
            dense = count(entry, grid, None, None)
            both = count(entry, grid, schedule, False)
            shared = count(entry, grid, schedule, True)
            rows.append(
                {
                    "model": entry.name,
                    "height": height,
                    "width": width,
                    "frames": FRAMES,
                    "tokens": grid[0] * grid[1] * grid[2],
                    "attn_macs_dense": dense.attention,
                    "attn_macs_t3": both.attention,
                    "attn_macs_t3_shared": shared.attention,
                    "dit_macs_dense": dense.total,
                    "dit_macs_t3": both.total,
                    "dit_macs_t3_shared": shared.total,
                    "label": label,
                    "grid": grid,
                }
            )
    return rows


def _tera(macs: int) -> str:
    return f"{macs / 1e12:,.1f}"


def _ratio(num: int, den: int) -> str:
    return f"{num / den:.2f}x"


def markdown(rows: list[dict[str, Any]]) -> str:
    """The table in Markdown, with a header that says what is counted and which schedules."""
    names = ", ".join(f"{m.name}: `{m.schedule}` (= `{m.schedule_4k}` at 4K)" for m in MODELS)
    lines = [
        f"# Dense vs T3 attention: multiply-accumulates per DiT forward ({FRAMES} frames, batch 1, "
        f"{TEXT_TOKENS} text tokens, all layers)",
        "",
        f"T3 schedules: {names}. The authors' fixed-piece presets only fit the 4K grid, so every resolution "
        "uses their window-size rewrite, which keeps the authors' window sizes and equals their plans at 4K.",
        "'both' computes the local and the dilated branch in every windowed layer (how the paper counts); "
        "'shared' computes one branch where the two partitions coincide (same output). "
        "TMAC = 10^12 multiply-accumulates (1 MAC = 2 FLOPs); padded window slots are counted, as the op "
        "computes them. Attention = self-attention scores and weighted sum; DiT = every matmul of the forward, "
        "with one timestep per video for both models (text-to-video: Wan2.2-TI2V's time embedding runs once per "
        "video, not per token).",
        "",
        f"Every figure is one DiT pass. A video at the authors' protocol ({STEPS} steps, classifier-free "
        f"guidance) is {STEPS * CFG_PASSES} DiT passes ({STEPS} steps x {CFG_PASSES}): multiply by "
        f"{STEPS * CFG_PASSES} for the DiT MACs of a whole video.",
        "",
        "| Model | Res. | H x W | Grid (T,H,W) | Tokens | Attn dense (TMAC) | Attn T3 both | x | Attn T3 shared | x "
        "| DiT dense (TMAC) | DiT T3 both | x | DiT T3 shared | x |",
        "|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['label']} | {r['height']}x{r['width']} | {'x'.join(map(str, r['grid']))} "
            f"| {r['tokens']:,} "
            f"| {_tera(r['attn_macs_dense'])} | {_tera(r['attn_macs_t3'])} "
            f"| {_ratio(r['attn_macs_dense'], r['attn_macs_t3'])} "
            f"| {_tera(r['attn_macs_t3_shared'])} | {_ratio(r['attn_macs_dense'], r['attn_macs_t3_shared'])} "
            f"| {_tera(r['dit_macs_dense'])} | {_tera(r['dit_macs_t3'])} "
            f"| {_ratio(r['dit_macs_dense'], r['dit_macs_t3'])} "
            f"| {_tera(r['dit_macs_t3_shared'])} | {_ratio(r['dit_macs_dense'], r['dit_macs_t3_shared'])} |"
        )
    return "\n".join(lines) + "\n"


def csv_text(rows: list[dict[str, Any]]) -> str:
    """The exact counts as CSV: the JSON keys, the grid and the four reduction factors."""
    buf = io.StringIO()
    ratios = {
        "attn_reduction_t3": ("attn_macs_dense", "attn_macs_t3"),
        "attn_reduction_t3_shared": ("attn_macs_dense", "attn_macs_t3_shared"),
        "dit_reduction_t3": ("dit_macs_dense", "dit_macs_t3"),
        "dit_reduction_t3_shared": ("dit_macs_dense", "dit_macs_t3_shared"),
    }
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*JSON_KEYS, "grid", *ratios])
    for r in rows:
        writer.writerow(
            [*(r[k] for k in JSON_KEYS), "x".join(map(str, r["grid"]))]
            + [f"{r[num] / r[den]:.4f}" for num, den in ratios.values()]
        )
    return buf.getvalue()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object per row instead of Markdown"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"folder for efficiency_table.md/.csv (default {DEFAULT_OUT})",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rows = table_rows()
    table = markdown(rows)
    write_text_atomic(args.out / "efficiency_table.md", table)
    write_text_atomic(args.out / "efficiency_table.csv", csv_text(rows))
    if args.json:
        for r in rows:
            print(json.dumps({k: r[k] for k in JSON_KEYS}))
    else:
        print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())

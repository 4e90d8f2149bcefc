"""Dense vs T3 attention, one layer in the Wan2.1 head layout, from about 1k to 64k tokens.

For each token grid it measures, side by side in one run, the latency and peak memory of
- dense attention (one scaled_dot_product_attention over all tokens),
- T3 attention (`t3_attention`: both branches, grouped into one call),
- the straightforward T3 implementation (rearrange + copy per tensor per branch, two calls, mean),
and prints the speed-up of T3 over dense, the FLOP ratio, their quotient (efficiency: 1.0 means
T3 runs as many FLOP/s as dense), our speed-up over the straightforward implementation, the peak
memory ratio, and the fitted exponent of time vs tokens for each method.

    python benchmarks/attention.py                      # CPU float32, windows (21, 8, 8)
    python benchmarks/attention.py --device cuda --dtype bfloat16 --dense-max-tokens 70000

Outputs: a table on stdout, ``benchmarks/results/attention_<device>.csv`` and ``.png``.
"""

from __future__ import annotations

import argparse
import csv
import functools
import logging
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from t3.attention import LayerRule, t3_attention
from t3.attention.flops import dense_attention_macs, plan_attention_macs
from t3.attention.plan import effective_branches
from t3.attention.reference import straightforward_t3_attention
from t3.io import atomic_path, write_text_atomic
from t3.profiling import device_name, peak_memory_bytes, saved_for_backward_bytes, time_call

# T = 21 latent frames (81 video frames); H x W grow so tokens go from 1,344 to 64,512.
GRIDS = [(21, 8, 8), (21, 8, 16), (21, 16, 16), (21, 16, 32), (21, 32, 32), (21, 32, 64), (21, 48, 64)]


def dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(
        1, 2
    )


def fit_exponent(tokens: list[int], seconds: list[float]) -> float:
    """Least-squares slope of log(time) against log(tokens)."""
    if len(tokens) < 2:
        return float("nan")
    xs, ys = [math.log(t) for t in tokens], [math.log(s) for s in seconds]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    rule = LayerRule(window=tuple(None if w == 0 else w for w in args.window))
    rows = []
    for grid in GRIDS:
        L = math.prod(grid)
        if L > args.max_tokens:
            break
        plan = rule.plan(grid)
        computed = effective_branches(plan, grid, rule.branches)
        q, k, v = (torch.randn(1, L, args.heads, args.head_dim, device=device, dtype=dtype) for _ in range(3))
        methods = {
            "t3": functools.partial(t3_attention, q, k, v, grid, plan, backend=args.backend),
            "straightforward": functools.partial(straightforward_t3_attention, q, k, v, grid, plan),
        }
        if L <= args.dense_max_tokens:
            methods["dense"] = functools.partial(dense, q, k, v)
        row = {
            "tokens": L,
            "grid": "x".join(map(str, grid)),
            "plan": str(plan),
            "window_tokens": plan.group_size(grid),
            "flop_ratio": dense_attention_macs(L, args.heads, args.head_dim)
            / plan_attention_macs(grid, plan, computed, args.heads, args.head_dim),
        }
        # Interleave the methods round by round and keep each one's fastest round, so that load from
        # other processes on a shared machine hits all methods alike and inflates none of the minima.
        with torch.no_grad():
            timings: dict[str, list[float]] = {name: [] for name in methods}
            for fn in methods.values():
                fn()  # warm-up
            for _ in range(args.repeats):
                for name, fn in methods.items():
                    timings[name].append(time_call(fn, device, warmup=0, repeats=1).min_s)
            for name, fn in methods.items():
                row[f"{name}_s"] = min(timings[name])
                row[f"{name}_peak_mib"] = peak_memory_bytes(fn, device) / 2**20
        # Training: what autograd holds between forward and backward (the output excluded).
        for name, fn in methods.items():
            row[f"{name}_saved_mib"] = saved_for_backward_bytes(fn, (q, k, v), device) / 2**20
        if "dense_s" in row:
            row["speedup"] = row["dense_s"] / row["t3_s"]
            row["efficiency"] = row["speedup"] / row["flop_ratio"]
        row["vs_straightforward"] = row["straightforward_s"] / row["t3_s"]
        row["mem_vs_straightforward"] = row["t3_peak_mib"] / row["straightforward_peak_mib"]
        row["saved_vs_straightforward"] = row["t3_saved_mib"] / row["straightforward_saved_mib"]
        rows.append(row)
        logging.info("grid %s done", grid)
    return rows


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict], header: str) -> str:
    lines = [
        header,
        "",
        "| tokens | grid | plan | window | dense s | T3 s | straightf. s | speed-up | FLOP ratio | efficiency "
        "| vs straightf. | dense MiB | T3 MiB | straightf. MiB | T3/straightf. mem "
        "| saved for bwd: dense | T3 | straightf. | T3/straightf. |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tokens']} | {r['grid']} | {r['plan']} | {r['window_tokens']} | {fmt(r.get('dense_s'), '.4f')} "
            f"| {r['t3_s']:.4f} | {r['straightforward_s']:.4f} | {fmt(r.get('speedup'), '.2f')} | {r['flop_ratio']:.2f} "
            f"| {fmt(r.get('efficiency'), '.2f')} | {r['vs_straightforward']:.2f} | {fmt(r.get('dense_peak_mib'), '.1f')} "
            f"| {r['t3_peak_mib']:.1f} | {r['straightforward_peak_mib']:.1f} | {r['mem_vs_straightforward']:.2f} "
            f"| {fmt(r.get('dense_saved_mib'), '.1f')} | {r['t3_saved_mib']:.1f} | {r['straightforward_saved_mib']:.1f} "
            f"| {r['saved_vs_straightforward']:.2f} |"
        )
    exps = {}
    for name in ("dense", "t3", "straightforward"):
        pts = [(r["tokens"], r[f"{name}_s"]) for r in rows if f"{name}_s" in r]
        exps[name] = fit_exponent([p[0] for p in pts], [p[1] for p in pts])
    lines += ["", "fitted exponent of time vs tokens: " + ", ".join(f"{k} {v:.2f}" for k, v in exps.items())]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, style in (("dense", "o-"), ("t3", "s-"), ("straightforward", "^--")):
        pts = [(r["tokens"], r[f"{name}_s"], r[f"{name}_peak_mib"]) for r in rows if f"{name}_s" in r]
        if pts:
            ax_t.loglog([p[0] for p in pts], [p[1] for p in pts], style, label=name)
            ax_m.loglog([p[0] for p in pts], [p[2] for p in pts], style, label=name)
    ax_t.set(xlabel="tokens", ylabel="latency (s)", title="one attention layer")
    ax_m.set(xlabel="tokens", ylabel="peak memory (MiB)", title="peak memory of the call")
    for ax in (ax_t, ax_m):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--backend", default="auto", choices=["auto", "sdpa", "flash"])
    parser.add_argument("--heads", type=int, default=12, help="Wan2.1-1.3B: 12 heads x 128")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--window", type=int, nargs=3, default=[0, 8, 8], help="w_t w_h w_w, 0 = whole axis")
    parser.add_argument("--max-tokens", type=int, default=70_000)
    parser.add_argument(
        "--dense-max-tokens", type=int, default=25_000, help="dense is quadratic: cap it on CPU"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    rows = run(args)
    where = device_name(args.device)
    header = (
        f"T3 vs dense attention, 1 layer, batch 1, {args.heads} heads x {args.head_dim}, {args.dtype}, "
        f"backend {args.backend}, windows {tuple(args.window)} (0 = whole axis), fastest of {args.repeats} interleaved rounds; "
        f"measured on {where}, torch {torch.__version__}"
    )
    text = table(rows, header)
    print(text)
    tag = "cuda" if args.device.startswith("cuda") else "cpu"
    write_text_atomic(args.out / f"attention_{tag}.md", text + "\n")
    fields = sorted({key for r in rows for key in r}, key=lambda k: (k not in ("tokens", "grid", "plan"), k))

    with atomic_path(args.out / f"attention_{tag}.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, args.out / f"attention_{tag}.png", header)
    return rows


if __name__ == "__main__":
    main()

"""Dense vs T3 attention, one layer in the Wan2.1 head layout, from about 1k to 64k tokens.

For each token grid it measures, side by side in one run, the latency and peak memory of
- dense attention (one scaled_dot_product_attention over all tokens),
- T3 attention (`t3_attention` with its defaults: on CPU, runs of a few windows per call),
- T3 attention with every group in one call (``tokens_per_call`` unbounded),
- the straightforward T3 implementation (rearrange + copy per tensor per branch, two calls, mean),
and prints the speed-up of T3 over dense, the FLOP ratio, their quotient (efficiency: 1.0 means
T3 runs as many FLOP/s as dense), our speed-up over the straightforward implementation, the peak
memory ratio, what autograd holds for backward, the time of a training step (forward + backward)
of T3 (also with ``regroup_in_backward=False``, which keeps the grouped copies for backward instead
of rebuilding them) and of the straightforward implementation, and the fitted exponent of time vs tokens for
each method, next to the exponent that T3's own MAC count implies over the same grids.

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
from collections.abc import Callable
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


def training_step(
    forward: Callable[[], torch.Tensor], leaves: list[torch.Tensor], grad_out: torch.Tensor
) -> None:
    forward().backward(grad_out)
    for x in leaves:
        x.grad = None


def interleaved(
    methods: dict[str, Callable[[], object]], device: torch.device, repeats: int, row: dict, suffix: str
) -> None:
    """Time every method once per round for ``repeats`` rounds; record each one's fastest round."""
    timings: dict[str, list[float]] = {name: [] for name in methods}
    for fn in methods.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in methods.items():
            timings[name].append(time_call(fn, device, warmup=0, repeats=1).min_s)
    for name in methods:
        row[f"{name}{suffix}"] = min(timings[name])


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
            "t3_one_call": functools.partial(
                t3_attention, q, k, v, grid, plan, backend=args.backend, tokens_per_call=2**62
            ),
            "straightforward": functools.partial(straightforward_t3_attention, q, k, v, grid, plan),
        }
        if L <= args.dense_max_tokens:
            methods["dense"] = functools.partial(dense, q, k, v)
        t3_macs = plan_attention_macs(grid, plan, computed, args.heads, args.head_dim)
        row = {
            "tokens": L,
            "grid": "x".join(map(str, grid)),
            "plan": str(plan),
            "window_tokens": plan.group_size(grid),
            "branches_computed": len(computed),
            "t3_macs": t3_macs,
            "flop_ratio": dense_attention_macs(L, args.heads, args.head_dim) / t3_macs,
        }
        # Interleave the methods round by round and keep each one's fastest round, so that load from
        # other processes on a shared machine hits all methods alike and inflates none of the minima.
        with torch.no_grad():
            interleaved(methods, device, args.repeats, row, "_s")
            for name, fn in methods.items():
                if name != "t3_one_call":
                    row[f"{name}_peak_mib"] = peak_memory_bytes(fn, device) / 2**20
        # Training: what autograd holds between forward and backward (the output excluded), and
        # the time of forward + backward.
        for name in ("t3", "straightforward", "dense"):
            if name in methods:
                row[f"{name}_saved_mib"] = saved_for_backward_bytes(methods[name], (q, k, v), device) / 2**20
        if args.backward:
            leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
            grad_out = torch.randn_like(q)
            steps = {
                "t3": functools.partial(t3_attention, *leaves, grid, plan, backend=args.backend),
                # What keeping q, k, v once (rebuilding the grouped copies in backward) costs in time.
                "t3_keep_copies": functools.partial(
                    t3_attention, *leaves, grid, plan, backend=args.backend, regroup_in_backward=False
                ),
                "straightforward": functools.partial(straightforward_t3_attention, *leaves, grid, plan),
            }
            interleaved(
                {name: functools.partial(training_step, fn, leaves, grad_out) for name, fn in steps.items()},
                device,
                args.repeats,
                row,
                "_train_s",
            )
            row["train_vs_straightforward"] = row["straightforward_train_s"] / row["t3_train_s"]
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
        "Forward latency (no grad):",
        "",
        "| tokens | grid | plan | window | branches | dense s | T3 s | T3 one call s | straightf. s | speed-up "
        "| FLOP ratio | efficiency | vs straightf. |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tokens']} | {r['grid']} | {r['plan']} | {r['window_tokens']} | {r['branches_computed']} "
            f"| {fmt(r.get('dense_s'), '.4f')} | {r['t3_s']:.4f} | {r['t3_one_call_s']:.4f} | {r['straightforward_s']:.4f} "
            f"| {fmt(r.get('speedup'), '.2f')} | {r['flop_ratio']:.2f} | {fmt(r.get('efficiency'), '.2f')} "
            f"| {r['vs_straightforward']:.2f} |"
        )
    lines += [
        "",
        "Memory (MiB) and training step (forward + backward, s):",
        "",
        "| tokens | peak: dense | T3 | straightf. | T3/straightf. | saved for bwd: dense | T3 | straightf. "
        "| T3/straightf. | train: T3 s | T3 keeping copies s | straightf. s | T3 vs straightf. |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tokens']} | {fmt(r.get('dense_peak_mib'), '.1f')} | {r['t3_peak_mib']:.1f} "
            f"| {r['straightforward_peak_mib']:.1f} | {r['mem_vs_straightforward']:.2f} "
            f"| {fmt(r.get('dense_saved_mib'), '.1f')} | {r['t3_saved_mib']:.1f} | {r['straightforward_saved_mib']:.1f} "
            f"| {r['saved_vs_straightforward']:.2f} | {fmt(r.get('t3_train_s'), '.3f')} "
            f"| {fmt(r.get('t3_keep_copies_train_s'), '.3f')} "
            f"| {fmt(r.get('straightforward_train_s'), '.3f')} | {fmt(r.get('train_vs_straightforward'), '.2f')} |"
        )
    lines += ["", *exponents(rows)]
    return "\n".join(lines)


def exponents(rows: list[dict]) -> list[str]:
    """Fitted exponents of time vs tokens, and the exponent T3's MAC count implies on the same grids.

    Where both partitions coincide (one window covers the grid) T3 computes one branch, half the
    MACs per token of the grids above it, so over a range that starts there even a kernel that
    runs every MAC at the same speed shows an exponent above 1. Hence also the fit over the grids
    where both branches are computed.
    """

    def fit(name: str, value: str, keep=lambda r: True) -> float:
        pts = [(r["tokens"], r[value]) for r in rows if value in r and keep(r)]
        return fit_exponent([p[0] for p in pts], [p[1] for p in pts])

    measured = ", ".join(
        f"{name} {fit(name, f'{name}_s'):.2f}" for name in ("dense", "t3", "t3_one_call", "straightforward")
    )
    both = lambda r: r["branches_computed"] == 2  # noqa: E731
    span = [r["tokens"] for r in rows if both(r)]
    lines = [
        f"fitted exponent of time vs tokens, all grids: {measured}; "
        f"T3's MAC count alone implies {fit('t3', 't3_macs'):.2f}",
    ]
    if len(span) >= 2:
        lines.append(
            f"over the grids where T3 computes both branches ({span[0]}-{span[-1]} tokens): "
            f"T3 {fit('t3', 't3_s', both):.2f}, T3 one call {fit('t3', 't3_one_call_s', both):.2f}, "
            f"straightforward {fit('s', 'straightforward_s', both):.2f}; MAC count {fit('t3', 't3_macs', both):.2f}"
        )
    if any("t3_train_s" in r for r in rows):
        lines.append(
            f"training step exponent, all grids: T3 {fit('t3', 't3_train_s'):.2f}, "
            f"straightforward {fit('s', 'straightforward_train_s'):.2f}"
        )
    return lines


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
    parser.add_argument(
        "--no-backward", dest="backward", action="store_false", help="skip the training-step timings"
    )
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

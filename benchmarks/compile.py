"""torch.compile of a T3-transformed DiT: graphs compiled, compile time and step latency vs eager.

A 30-layer DiT of the tiny preset's width (2 heads x 12, `t3.models.tiny`) is transformed with
``wan21_windows`` and run at two resolutions, alternating, eagerly and under ``torch.compile``
(inductor), in one process. It reports, per resolution, the first compiled call (tracing and code
generation), the median forward latency of eager and compiled calls, their ratio, and for the whole
run the graphs dynamo compiled, its graph breaks and whether it hit ``recompile_limit`` (the failure
this benchmark guards against: before the fix, every distinct layer plan recompiled the processor and
the model fell back to eager after 8 recompiles).

    python benchmarks/compile.py                 # CPU, float32, one thread
    python benchmarks/compile.py --device cuda --dtype bfloat16

The tiny width says how compile treats the T3 processor (graph count, recompiles, Python and launch
overhead removed), not what it gains on a real model, whose step time is dominated by large matmuls and
attention kernels. Output: a table on stdout and ``benchmarks/results/compile_<device>.md``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel
from torch._dynamo.utils import counters

import t3
from t3.io import write_text_atomic
from t3.models.tiny import TINY_DIT_CONFIG
from t3.profiling import device_name

# Latent (frames, height, width) of the two resolutions: token grids 5x8x8 and 9x16x16.
LATENTS = [(5, 16, 16), (9, 32, 32)]


def inputs(latent: tuple[int, int, int], device: torch.device, dtype: torch.dtype) -> tuple:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, TINY_DIT_CONFIG["in_channels"], *latent, generator=g)
    text = torch.randn(1, 16, TINY_DIT_CONFIG["text_dim"], generator=g)
    return x.to(device, dtype), torch.tensor([500.0], device=device), text.to(device, dtype)


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> str:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    torch._dynamo.config.fail_on_recompile_limit_hit = True  # instead of silently falling back to eager
    torch.manual_seed(0)
    model = WanTransformer3DModel(**{**TINY_DIT_CONFIG, "num_layers": args.layers}).eval().to(device)
    if dtype != torch.float32:
        model.to(dtype)
    t3.transform(model, "wan21_windows")
    compiled = torch.compile(model)
    batches = {latent: inputs(latent, device, dtype) for latent in LATENTS}
    first_call, eager, fast = {}, {latent: [] for latent in LATENTS}, {latent: [] for latent in LATENTS}
    with torch.no_grad():
        for latent, batch in batches.items():  # the first compiled call at each resolution compiles
            first_call[latent] = timed(lambda batch=batch: compiled(*batch), device)
        for _ in range(args.repeats):  # alternate resolutions: a recompile would show here
            for latent, batch in batches.items():
                eager[latent].append(timed(lambda batch=batch: model(*batch), device))
                fast[latent].append(timed(lambda batch=batch: compiled(*batch), device))

    breaks = sum(counters["graph_break"].values())
    graphs = counters["stats"]["unique_graphs"]
    lines = [
        f"# torch.compile of a T3 DiT ({args.layers} layers, tiny width 2 x 12, wan21_windows)",
        "",
        f"Device: {device_name(device)}; {args.dtype}; torch {torch.__version__}; inductor; "
        f"median of {args.repeats} calls per resolution, alternating.",
        "",
        "| latent (T, H, W) | tokens | first compiled call (s) | eager (ms) | compiled (ms) | eager / compiled |",
        "|---|---|---|---|---|---|",
    ]
    for latent in LATENTS:
        tokens = latent[0] * (latent[1] // 2) * (latent[2] // 2)
        e, c = statistics.median(eager[latent]), statistics.median(fast[latent])
        lines.append(
            f"| {latent} | {tokens:,} | {first_call[latent]:.1f} | {e * 1e3:.1f} | {c * 1e3:.1f} | {e / c:.2f}x |"
        )
    lines += [
        "",
        f"Graphs compiled: {graphs} (one per resolution expected); graph breaks: {breaks}; "
        f"recompile limit ({torch._dynamo.config.recompile_limit}) not hit (a hit stops the benchmark).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--layers", type=int, default=30)
    # One thread: on a shared CPU, more threads than free cores make every small op spin-wait.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--out", type=Path, default=None, help="default: benchmarks/results/compile_<device>.md"
    )
    args = parser.parse_args()
    report = run(args)
    print(report)
    out = args.out or Path(__file__).parent / "results" / f"compile_{torch.device(args.device).type}.md"
    write_text_atomic(out, report)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

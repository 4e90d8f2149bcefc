"""Sequence parallelism (SP) for the authors' 4K schedules, and a measured 2-process CPU run.

Part 1 is exact arithmetic on the real grids (no model, no GPU): for Wan2.1-T2V-1.3B with ``wan21_4k``
(grid 21x136x240, 12 heads) and Wan2.2-TI2V-5B with ``wan22_4k`` (21x68x120, 24 heads) at sp = 2, 4, 8:

- per layer of the schedule's period: the assignment chosen (`t3.parallel.assignment`), the per-rank
  attention MACs (largest rank, and its imbalance over the mean), the bytes the T3-aware exchange sends
  in the forward and what Ulysses would send (``4 L N D e (sp - 1) / sp``; Ulysses itself needs the
  heads divisible by sp, marked "n/a" otherwise), both in bf16, and what the layer's SP attention holds
  on the busiest GPU (exchange buffers and grouped copies, `LayerCost.attention_bytes`);
- the whole-frame layer (plan (21,1,1)) both ways: skipping the exchange (every frame on the rank that
  holds most of it) against the balanced assignment, for shards cut evenly by tokens and on frame
  boundaries (where the per-token work of the whole model is then imbalanced too);
- per training step (30 layers, forward; the backward moves the same bytes again): bytes and attention
  MACs per rank, the bytes one GPU sends per training sample (forward, recompute and backward
  exchanges and the output gather: `t3.parallel.cost.step_communication`, as the dry run counts them),
  and the activation memory per GPU (bf16, micro-batch 1, per-block checkpointing) next to one GPU's,
  by the dry run's formula (`t3.memory.activation_memory`): block inputs and one recomputed block on
  the rank's shard, its attention as the largest layer's SP buffers and grouped copies;
- the time to build rank 0's exchange plans for one period at 4K (measured: the first-step cost).

Part 2 measures, on this machine's CPU, a small Wan2.1-layout DiT (12 heads x 16, 4 layers) at grid
9x16x24 under ``dense`` and ``wan21_windows``: forward and training-step time of SP over 2 processes
(gloo, 1 thread each) against one process with 1 and with 2 threads, in interleaved rounds.

    python benchmarks/sequence_parallel.py                  # both parts (a few minutes on 2 CPU cores)
    python benchmarks/sequence_parallel.py --skip-measure   # part 1 only; the measured part of the results
                                                            # file is kept as it was, with its machine label

Outputs: the tables on stdout, ``benchmarks/results/sequence_parallel.md`` and ``.csv`` (per layer).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from t3.attention import get_schedule
from t3.attention.schedule import WAN21_4K_GRID, WAN22_4K_GRID
from t3.io import atomic_path, write_text_atomic
from t3.memory import activation_memory
from t3.models.presets import dit_config
from t3.parallel import exchange_plan, layer_candidates, shard_layout
from t3.parallel.cost import LayerCost, peak_attention_bytes, schedule_costs, step_communication
from t3.profiling import device_name

GIB, GB = 2**30, 1e9
BF16 = 2
MODELS = {  # preset: (schedule, 4K grid)
    "wan2.1-t2v-1.3b": ("wan21_4k", WAN21_4K_GRID),
    "wan2.2-ti2v-5b": ("wan22_4k", WAN22_4K_GRID),
}


def _fmt_ulysses(cost: LayerCost, value: str) -> str:
    return value if cost.assignment.heads % cost.assignment.layout.sp == 0 else f"n/a ({value})"


def arithmetic(sp_sizes: list[int], csv_rows: list[dict]) -> list[str]:
    lines = []
    for preset, (schedule_name, grid) in MODELS.items():
        config = dit_config(preset)
        heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
        layers, dim, ffn = config["num_layers"], heads * head_dim, config["ffn_dim"]
        schedule = get_schedule(schedule_name)
        tokens = math.prod(grid)
        period = schedule.period
        lines += [
            f"### {preset}, `{schedule_name}`, grid {'x'.join(map(str, grid))} ({tokens:,} tokens), "
            f"{heads} heads x {head_dim}",
            "",
            "Per layer of the period, forward, bf16 (shards cut evenly by tokens):",
            "",
            "| sp | layer | plan | assignment | attention GMACs, largest rank | imbalance | T3-aware GB | "
            "Ulysses GB | T3 / Ulysses | rows computed where they live | SP attention GiB per GPU |",
            "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        step_lines = []
        for sp in sp_sizes:
            costs = schedule_costs(schedule, grid, layers, heads, head_dim, sp)
            for cost in costs[:period]:
                a = cost.assignment
                t3_gb, uly_gb = cost.bytes(BF16) / GB, cost.ulysses_bytes(BF16) / GB
                lines.append(
                    f"| {sp} | {cost.layer} | {a.plan} | {a.policy} | {max(cost.macs_per_rank) / 1e9:,.1f} | "
                    f"{a.imbalance * 100:.1f}% | {t3_gb:.2f} | {_fmt_ulysses(cost, f'{uly_gb:.2f}')} | "
                    f"{cost.bytes_vs_ulysses:.2f} | {sum(a.kept_rows) / (tokens * heads):.0%} | "
                    f"{max(cost.attention_bytes(BF16)) / GIB:.2f} |"
                )
                csv_rows.append(
                    {
                        "model": preset, "schedule": schedule_name, "sp": sp, "layer": cost.layer,
                        "plan": str(a.plan), "assignment": a.policy, "units_per_rank": " ".join(map(str, a.units)),
                        "imbalance": round(a.imbalance, 5), "max_rank_attention_macs": max(cost.macs_per_rank),
                        "t3_bytes_bf16": int(cost.bytes(BF16)), "ulysses_bytes_bf16": int(cost.ulysses_bytes(BF16)),
                        "ulysses_applies": heads % sp == 0, "t3_over_ulysses": round(cost.bytes_vs_ulysses, 4),
                        "max_rank_attention_bytes_bf16": int(max(cost.attention_bytes(BF16))),
                    }
                )  # fmt: skip
            t3_step = sum(c.bytes(BF16) for c in costs) / GB
            uly_step = sum(c.ulysses_bytes(BF16) for c in costs) / GB
            macs_max = sum(max(c.macs_per_rank) for c in costs)
            macs_mean = sum(sum(c.macs_per_rank) for c in costs) / sp
            layout = costs[0].assignment.layout
            branches = max(len(c.assignment.branches) for c in costs)
            memory = dict(
                dim=dim, ffn_dim=ffn, num_layers=layers, micro_batch=1, bytes_per_value=BF16, branches=branches,
                checkpointing=True, offload=False,
            )  # fmt: skip
            one_gpu = activation_memory(tokens=tokens, **memory)[0]
            # On a rank, as the dry run counts it: its shard, and the largest layer's SP attention (exchange
            # buffers of q, k, v and outputs, grouped copies) in place of one GPU's grouped copies.
            buffers = peak_attention_bytes(costs, BF16)
            per_gpu = activation_memory(tokens=layout.shard_size, attention_bytes=buffers, **memory)[0]
            sent = step_communication(
                costs, out_width=config["out_channels"] * math.prod(config["patch_size"]), bytes_per_value=BF16,
                micro_batch=1, accumulate=1, checkpointing=True,
            )  # fmt: skip
            step_lines.append(
                f"| {sp} | {t3_step:,.1f} | {_fmt_ulysses(costs[0], f'{uly_step:,.1f}')} | {t3_step / uly_step:.2f} | "
                f"{macs_max / 1e12:,.1f} | {(macs_max / macs_mean - 1) * 100:.1f}% | "
                f"{sent.total / GB:,.1f} | {_fmt_ulysses(costs[0], f'{(sent.ulysses + sent.gather) / GB:,.1f}')} | "
                f"{one_gpu / GIB:.1f} | {per_gpu / GIB:.1f} ({buffers / GIB:.2f} SP attention) |"
            )
        lines += [
            "",
            f"Per training step ({layers} layers; group bytes of the forward, the backward moves them again), "
            "bf16; sent per GPU per sample: the busiest rank's forward, recompute and backward exchanges and "
            "the output gather (the dry run's figure at micro-batch 1, accumulate 1):",
            "",
            "| sp | T3-aware GB | Ulysses GB | T3 / Ulysses | attention TMACs, largest rank | imbalance | "
            "sent per GPU per sample GB, T3-aware | Ulysses | activations GiB, 1 GPU | "
            "activations GiB per GPU with SP |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            *step_lines,
            "",
            "Whole-frame layer (plan (21,1,1)): skip the exchange, or balance the work:",
            "",
            "| sp | shards cut by | per-token work imbalance | skip: attention imbalance | skip: GB | "
            "balanced: assignment | attention imbalance | GB | chosen |",
            "|---:|---|---:|---:|---:|---|---:|---:|---|",
        ]
        frame_plan = schedule.layer_plan(0, grid)
        for sp in sp_sizes:
            for align in ("tokens", "frames"):
                layout = shard_layout(grid, sp, align)
                candidates = layer_candidates(layout, frame_plan.plan, frame_plan.computed, heads)
                skip = candidates["owner"]
                balanced = min(candidates.values(), key=lambda a: (a.imbalance, a.moved_rows))
                chosen = schedule_costs(schedule, grid, 1, heads, head_dim, sp, align=align)[0].assignment
                gb = 4 * head_dim * BF16 / GB
                lines.append(
                    f"| {sp} | {align} | {layout.token_imbalance * 100:.1f}% | {skip.imbalance * 100:.1f}% | "
                    f"{skip.moved_rows * gb:.2f} | {balanced.policy} | {balanced.imbalance * 100:.1f}% | "
                    f"{balanced.moved_rows * gb:.2f} | {chosen.policy} |"
                )
        lines.append("")
    return lines


def plan_build_time(sp: int) -> list[str]:
    """Seconds to build rank 0's exchange plans of one ``wan21_4k`` period at 4K (the first-step cost)."""
    config = dit_config("wan2.1-t2v-1.3b")
    schedule = get_schedule("wan21_4k")
    layout = shard_layout(WAN21_4K_GRID, sp)
    start = time.perf_counter()
    for lp in schedule.plans(WAN21_4K_GRID, schedule.period):
        exchange_plan(layout, lp.plan, lp.computed, config["num_attention_heads"], 0)
    seconds = time.perf_counter() - start
    return [
        f"Building rank 0's exchange plans for the 5 layers of a `wan21_4k` period at 4K, sp={sp}: "
        f"{seconds:.1f} s on 1 CPU thread (once per grid; assignments included).",
        "",
    ]


# ---------------------------------------------------------------- part 2: measured on this CPU

SMALL = {
    **dit_config("wan2.1-t2v-1.3b"),
    "attention_head_dim": 16,
    "ffn_dim": 768,
    "num_layers": 4,
    "text_dim": 64,
    "freq_dim": 64,
    "rope_max_seq_len": 64,
}
LATENT = (16, 9, 32, 48)  # channels, frames, height, width: grid 9x16x24 = 3,456 tokens
SCHEDULES = ("dense", "wan21_windows")


def _small_model(schedule: str):
    from diffusers import WanTransformer3DModel

    import t3

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = WanTransformer3DModel(**SMALL)
    return t3.transform(model, schedule).train()


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, *LATENT, generator=g), torch.tensor([500.0]), torch.randn(1, 16, 64, generator=g)


def _passes(model) -> dict[str, Callable[[], None]]:
    """The two timed passes of ``model``: a forward without autograd, and a training step."""
    x, t, text = _inputs()

    def forward() -> None:
        with torch.no_grad():
            model(x, t, text)

    def train_step() -> None:
        model(x, t, text).sample.square().mean().backward()
        model.zero_grad(set_to_none=True)

    return {"forward": forward, "train_step": train_step}


def _seconds(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _sp_worker(rank: int, port: int, repeats: int, result: str) -> None:
    """Both ranks time the SP passes; between SP rounds rank 0 alone times one process with 1 and
    2 threads (rank 1 waits at a barrier), so that load changes on a shared CPU hit all three alike."""
    import torch.distributed as dist

    from t3.parallel import apply_sequence_parallel, build_parallel_groups

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    groups = build_parallel_groups(2)
    measured: dict[str, dict[str, dict[str, float]]] = {}
    for schedule in SCHEDULES:
        sp = _passes(apply_sequence_parallel(_small_model(schedule), groups.sp_group))
        single = _passes(_small_model(schedule)) if rank == 0 else {}
        times: dict[str, dict[str, list[float]]] = {what: {"sp": [], "1": [], "2": []} for what in sp}
        for round_ in range(repeats + 1):  # round 0 warms up (builds index and exchange plans)
            for what, fn in sp.items():
                dist.barrier()
                took = {"sp": _seconds(fn)}
                dist.barrier()
                if rank == 0:
                    for threads in (1, 2):
                        torch.set_num_threads(threads)
                        took[str(threads)] = _seconds(single[what])
                    torch.set_num_threads(1)
                    if round_:
                        for key, value in took.items():
                            times[what][key].append(value)
                dist.barrier()
        if rank == 0:
            measured[schedule] = {what: {k: min(v) for k, v in by.items()} for what, by in times.items()}
    if rank == 0:
        Path(result).write_text(json.dumps(measured))
    dist.destroy_process_group()


def measured_cpu(repeats: int, where: str) -> list[str]:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "sp.json")
        mp.spawn(_sp_worker, args=(port, repeats, result), nprocs=2)
        measured = json.loads(Path(result).read_text())

    grid = (LATENT[1], LATENT[2] // 2, LATENT[3] // 2)
    lines = [
        f"{MEASURED} {where} (a CPU other processes share: timings are noisy): a Wan2.1-layout DiT with {SMALL['num_attention_heads']} heads x {SMALL['attention_head_dim']}, "
        f"{SMALL['num_layers']} layers, grid {'x'.join(map(str, grid))} ({math.prod(grid):,} tokens), float32, "
        f"fastest of {repeats} interleaved rounds; SP = 2 processes (gloo) x 1 thread:",
        "",
        "| schedule | pass | 1 process, 1 thread s | 1 process, 2 threads s | SP 2 x 1 thread s | "
        "SP / 1 thread | SP / 2 threads |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for schedule in SCHEDULES:
        for what in ("forward", "train_step"):
            one, two, par = (measured[schedule][what][key] for key in ("1", "2", "sp"))
            lines.append(
                f"| {schedule} | {what.replace('_', ' ')} | {one:.3f} | {two:.3f} | {par:.3f} | "
                f"{par / one:.2f} | {par / two:.2f} |"
            )
    lines.append("")
    return lines


MEASURED = "Measured on"


def kept_measurement(previous: Path) -> list[str]:
    """The measured part of an earlier results file, with the machine it ran on (for ``--skip-measure``)."""
    text = previous.read_text() if previous.exists() else ""
    start = text.find("\nMeasured")
    if start < 0:
        return []
    section = text[start + 1 :].rstrip("\n")
    if not section.startswith(MEASURED):  # written before the section named its machine itself
        machine = re.search(r"run on (.+?)\. Part 1", text)
        where = machine.group(1) if machine else "a machine not recorded"
        section = section.replace("Measured:", f"{MEASURED} {where} (other processes share this CPU):", 1)
    return [
        "(The measured part below is kept from an earlier run; `--skip-measure` did not rerun it.)",
        "",
        section,
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sp", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--skip-measure", action="store_true", help="part 1 only; keep the measured part of the results file"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)

    load = os.getloadavg()[0]
    where = f"{device_name('cpu')}, torch {torch.__version__}, load average {load:.1f} at start"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # part 1 is many small tensor ops: one thread, no contention
    csv_rows: list[dict] = []
    lines = [
        "# Sequence parallelism: exchange bytes, balance and memory at 4K",
        "",
        f"`python benchmarks/sequence_parallel.py`, run on {where}. Part 1 is exact arithmetic (no "
        "measurement); timings are labelled as measured.",
        "",
        "Bytes per layer (forward): T3-aware `4 * moved_rows * D * e` (a moved (token, head) row carries "
        "q, k, v out and one partial output back; each row moves 0, 1 or 2 times), Ulysses "
        "`4 * L * N * D * e * (sp - 1) / sp`.",
        "",
        *arithmetic(args.sp, csv_rows),
        *plan_build_time(max(args.sp)),
    ]
    torch.set_num_threads(threads)
    if args.skip_measure:
        lines += kept_measurement(args.out / "sequence_parallel.md")
    else:
        lines += measured_cpu(args.repeats, where)
        lines.append(f"Load average at the end: {os.getloadavg()[0]:.1f} (other processes share this CPU).")
    text = "\n".join(lines)
    print(text)
    write_text_atomic(args.out / "sequence_parallel.md", text + "\n")
    with atomic_path(args.out / "sequence_parallel.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(csv_rows[0]))
        writer.writeheader()
        writer.writerows(csv_rows)


if __name__ == "__main__":
    sys.exit(main())

"""The speed stage: dense vs T3 at one video size, measured in one run on one device.

For each schedule (``dense`` and the run's T3 schedule) it reports

* MACs of one DiT forward with the CFG batch of 2 and of all steps of a video (`t3.attention.flops.dit_macs`,
  from shapes alone, so 4K counts run on a CPU without weights: ``speed.macs_only=true``). Generation feeds
  one timestep per video, Wan2.2-TI2V included (`t3.generate`), so the time embedding is counted once per
  sample, not per token;
* DiT step latency: one forward on the CFG batch (uncond + cond) at the video's latent shape;
* attention time: the T3 op alone (`t3.attention.t3_attention`) on the same ``[2, L, heads, head_dim]``
  shapes for every layer's plan, summed over layers, and its share of the step;
* peak memory of one DiT step (`t3.profiling.peak_memory_bytes`: CUDA allocator peak, or live tensor bytes
  on CPU);
* end-to-end latency when the VAE and text encoder are given: text encoding (uncached), all sampler
  steps with CFG, VAE decode, always stated with the DiT passes it took (``dit_passes``: steps x 2 with
  CFG, run as one batched forward of 2 per step), so a latency compares with another only at the same count
  (the paper's protocol: 50 steps x 2 = 100).

Before any model is built, the size is checked against the model's RoPE table and the DiT step's
memory (`t3.memory.check_inference_memory`) against the device: a 4K step of Wan2.1 needs over 100 GiB
in float32, so on a CPU the stage refuses and points at ``speed.macs_only=true`` or a smaller size.

Warm-up calls are excluded (``speed.warmup``), times are the median of ``speed.repeats`` calls. Every
figure is stored with the device name, dtype, attention backend and torch version. Absolute times mean
something only on the named device; dense vs T3 comparisons are ratios of figures from the same run.
Weight values do not change the work done, so without a checkpoint the DiT is randomly initialised (and
the output says so).

`measure_speed` is the importable entry point (``benchmarks/`` can call it); `run_speed` also writes
``speed.json`` and ``speed.md``.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from t3.attention import Schedule, choose_backend, get_schedule, t3_attention
from t3.attention.flops import dit_macs
from t3.eval.settings import (
    GenerationSettings,
    ModelPaths,
    SpeedSettings,
    check_settings,
    resolve_device,
    resolve_dtype,
)
from t3.generate import cfg_batch
from t3.io import write_json_atomic, write_text_atomic
from t3.memory import check_inference_memory
from t3.models import ModelSpec, get_spec
from t3.profiling import device_name, peak_memory_bytes, time_call

__all__ = [
    "attention_seconds",
    "count_macs",
    "dit_passes",
    "measure_speed",
    "run_speed",
    "speed_markdown",
]

logger = logging.getLogger(__name__)

#: CFG runs the conditional and unconditional passes as one forward on a batch of 2 (`t3.diffusion.sample`).
CFG_BATCH = 2

SPEED_PROMPT = "a red panda climbing a tree in a misty bamboo forest, cinematic, 4k"


def _grid(spec: ModelSpec, settings: GenerationSettings) -> tuple[int, int, int]:
    return spec.video_token_grid(settings.frames, settings.height, settings.width)


def count_macs(spec: ModelSpec, schedule: Schedule, settings: GenerationSettings) -> dict[str, int]:
    """MACs of one CFG-batched DiT forward and of a whole video's sampling (``steps`` forwards)."""
    breakdown = dit_macs(
        spec.dit_config, _grid(spec, settings), text_tokens=spec.text_len, batch=CFG_BATCH, schedule=schedule,
        per_token_timestep=False,  # one timestep per video in text-to-video generation, Wan2.2 included
    )  # fmt: skip
    return {
        "dit_step": breakdown.total,
        "dit_step_self_attention": breakdown.attention,
        "dit_video": breakdown.total * settings.steps,
    }


def dit_passes(steps: int, guidance_scale: float) -> int:
    """DiT passes of one video: ``steps x 2`` with classifier-free guidance (``guidance_scale > 1``), else ``steps``."""
    return steps * cfg_batch(guidance_scale)


def attention_seconds(
    schedule: Schedule,
    grid: tuple[int, int, int],
    num_layers: int,
    heads: int,
    head_dim: int,
    *,
    device: torch.device,
    dtype: torch.dtype,
    backend: str = "auto",
    tokens_per_call: int | None = None,
    warmup: int = 1,
    repeats: int = 3,
) -> float:
    """Seconds of the T3 op alone over all layers of one CFG-batched DiT forward.

    Layers with the same plan cost the same, so each distinct plan is timed once and weighted by its
    number of layers.
    """
    shape = (CFG_BATCH, math.prod(grid), heads, head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
    plans = Counter((lp.plan, lp.branches) for lp in schedule.plans(grid, num_layers))
    total = 0.0
    for (plan, branches), count in plans.items():
        timing = time_call(
            lambda plan=plan, branches=branches: t3_attention(
                q,
                k,
                v,
                grid,
                plan,
                branches,
                backend,
                share_identical=schedule.share_identical_branches,
                tokens_per_call=tokens_per_call,
            ),
            device,
            warmup=warmup,
            repeats=repeats,
        )
        total += count * timing.median_s
    return total


def _build_dit(model: ModelPaths, dtype: torch.dtype) -> tuple[torch.nn.Module, str]:
    if model.dit_path is None:
        from t3.models.build import dit_from_preset

        logger.info(
            "speed: %s DiT with random weights (timings do not depend on weight values)", model.preset
        )
        return dit_from_preset(model.preset).eval(), "random init"
    return model.load_dit(dtype), str(model.dit_path)


def measure_speed(
    *,
    model: ModelPaths,
    schedules: Sequence[Schedule],
    generation: GenerationSettings,
    speed: SpeedSettings,
) -> dict[str, Any]:
    """Measure every schedule at ``generation``'s size on its device; see the module docstring.

    Args:
        model: Preset and paths; without a DiT path the DiT gets random weights.
        schedules: Schedules to compare, the first being the baseline of the ratios (normally ``dense``).
        generation: Size, steps, guidance, dtype, device and attention backend.
        speed: What to measure and how often.

    Returns:
        ``{"setup": {...}, "results": [per schedule], "ratios": {...}}`` (the content of ``speed.json``).
    """
    spec = get_spec(model.preset)
    for schedule in schedules:
        check_settings(generation, model, schedule)
    device = resolve_device(generation.device)
    dtype = resolve_dtype(generation.dtype, device)
    grid = _grid(spec, generation)
    heads, head_dim = int(spec.dit_config["num_attention_heads"]), int(spec.dit_config["attention_head_dim"])
    num_layers = int(spec.dit_config["num_layers"])
    setup: dict[str, Any] = {
        "model": model.preset,
        "size": {"height": generation.height, "width": generation.width, "frames": generation.frames},
        "token_grid": list(grid),
        "tokens": math.prod(grid),
        "steps": generation.steps,
        "cfg_batch": CFG_BATCH,
        "dit_passes_per_video": dit_passes(generation.steps, generation.guidance_scale),
        "torch": torch.__version__,
        "created_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    rows: list[dict[str, Any]] = [
        {"schedule": s.name, "macs": count_macs(spec, s, generation)} for s in schedules
    ]
    if speed.macs_only:
        setup["measured"] = "MACs only (no model built)"
        return {"setup": setup, "results": rows, "ratios": _ratios(rows)}
    check_inference_memory(
        spec, (generation.height, generation.width, generation.frames), batch=CFG_BATCH, dtype=dtype,
        device=device, what="stage=speed", instead="speed.macs_only=true (MAC counts at this size, no model)",
        size_keys=("generation.height", "generation.width"),
    )  # fmt: skip

    probe = torch.empty(1, 1, heads, head_dim, device=device, dtype=dtype)
    setup.update(
        device=device_name(device),
        dtype=str(dtype).removeprefix("torch."),
        attention_backend=choose_backend(generation.backend, probe),
        warmup=speed.warmup,
        repeats=speed.repeats,
    )
    dit, weights = _build_dit(model, dtype)
    setup["weights"] = weights
    vae = text_encoder = None
    e2e_reason = None
    if speed.e2e:
        if (model.vae_path is None or model.text_encoder_path is None) and not model.random_parts:
            e2e_reason = "skipped: needs model.vae_path and model.text_encoder_path"
        else:
            vae = model.load_vae()
            text_encoder = model.load_text_encoder(dtype).to(device)
    else:
        e2e_reason = "disabled (speed.e2e=false)"

    from t3.generate import T2VGenerator
    from t3.models import PromptEmbeddingCache

    latent_shape = (CFG_BATCH, *spec.latent_shape(generation.frames, generation.height, generation.width))
    text = torch.randn(CFG_BATCH, spec.text_len, spec.text_dim, dtype=dtype, device=device)
    for schedule, row in zip(schedules, rows, strict=True):
        cache = PromptEmbeddingCache(text_encoder, max_length=spec.text_len, identity="speed")
        gen = T2VGenerator(
            dit, vae, text_encoder, spec=spec, schedule=schedule, backend=generation.backend,
            tokens_per_call=generation.tokens_per_call, scheduler=generation.sampler, flow_shift=generation.flow_shift, dtype=dtype, device=device,
            embedding_cache=cache, vae_tiling=generation.vae_tiling,
            allow_schedule_change=True,  # dense and T3 on the same weights: timings do not depend on them
        )  # fmt: skip
        x = torch.randn(latent_shape, dtype=dtype, device=device)
        t = torch.full((CFG_BATCH,), 500.0, device=device)

        def step(gen: T2VGenerator = gen, x: torch.Tensor = x, t: torch.Tensor = t) -> torch.Tensor:
            with torch.no_grad():
                return gen.denoise_fn(x, t, encoder_hidden_states=text)

        timing = time_call(step, device, warmup=speed.warmup, repeats=speed.repeats)
        row["dit_step_s"] = {"median": timing.median_s, "min": timing.min_s, "repeats": timing.repeats}
        if speed.attention:
            attn = attention_seconds(
                schedule, grid, num_layers, heads, head_dim, device=device, dtype=dtype,
                backend=generation.backend, tokens_per_call=generation.tokens_per_call,
                warmup=speed.warmup, repeats=speed.repeats,
            )  # fmt: skip
            row["attention_s"] = attn
            row["attention_share"] = attn / timing.median_s
        if speed.memory:
            row["dit_step_peak_memory_bytes"] = peak_memory_bytes(step, device)
        row["e2e_s"] = _e2e(gen, generation, speed) if e2e_reason is None else e2e_reason
        logger.info("speed %s: %s", schedule.name, row)
    return {"setup": setup, "results": rows, "ratios": _ratios(rows)}


def _e2e(gen: Any, generation: GenerationSettings, speed: SpeedSettings) -> dict[str, float]:
    """Median seconds per stage of a full video: text encoding (uncached), sampling with CFG, decode."""
    from t3.generate import generate
    from t3.models import PromptEmbeddingCache

    steps = speed.e2e_steps or generation.steps
    runs = []
    for i in range(speed.warmup + speed.repeats):
        # A fresh cache per run, so the text encoder really runs every time.
        gen.embedding_cache = PromptEmbeddingCache(gen.text_encoder, max_length=gen.spec.text_len)
        result = generate(
            [SPEED_PROMPT], generator=gen, height=generation.height, width=generation.width,
            frames=generation.frames, steps=1 if i < speed.warmup else steps,
            guidance_scale=generation.guidance_scale, negative_prompt=generation.negative, progress=False,
        )[0]  # fmt: skip
        if i >= speed.warmup:
            runs.append(result.timings)
    median = lambda values: sorted(values)[len(values) // 2]  # noqa: E731
    out = {
        "steps": steps,
        "dit_passes": dit_passes(steps, generation.guidance_scale),
        "text_encoding": median([r.text_encoding for r in runs]),
        "denoising": median([r.denoising for r in runs]),
        "decode": median([r.decode for r in runs]),
    }
    out["total"] = out["text_encoding"] + out["denoising"] + out["decode"]
    return out


def _ratios(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Baseline (first row) over each other row: > 1 means the other schedule is cheaper or faster."""
    base = rows[0]
    ratios = {}
    for row in rows[1:]:
        r = {
            "dit_step_macs": base["macs"]["dit_step"] / row["macs"]["dit_step"],
            "self_attention_macs": base["macs"]["dit_step_self_attention"]
            / row["macs"]["dit_step_self_attention"],
        }
        if "dit_step_s" in row:
            r["dit_step_latency"] = base["dit_step_s"]["median"] / row["dit_step_s"]["median"]
        if "attention_s" in row:
            r["attention_latency"] = base["attention_s"] / row["attention_s"]
        if "dit_step_peak_memory_bytes" in row and row["dit_step_peak_memory_bytes"]:
            r["dit_step_peak_memory"] = base["dit_step_peak_memory_bytes"] / row["dit_step_peak_memory_bytes"]
        if isinstance(row.get("e2e_s"), dict) and isinstance(base.get("e2e_s"), dict):
            r["e2e_latency"] = base["e2e_s"]["total"] / row["e2e_s"]["total"]
        ratios[f"{base['schedule']}/{row['schedule']}"] = r
    return ratios


def _scaled(value: float, units: Sequence[tuple[float, str]]) -> str:
    """``value`` in the largest unit it reaches: 3 significant digits, or whole numbers from 100 up."""
    factor, unit = next(((f, u) for f, u in units if value >= f), units[-1])
    scaled = value / factor
    return (f"{scaled:,.0f}" if scaled >= 100 else f"{scaled:.3g}") + (f" {unit}" if unit else "")


def _macs(value: int) -> str:
    return _scaled(value, [(1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"), (1.0, "")])


def _bytes(value: int) -> str:
    return _scaled(value, [(2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB"), (1.0, "B")])


def speed_markdown(report: dict[str, Any]) -> str:
    """``report`` (from `measure_speed`) as a Markdown table with its setup and ratios."""
    s = report["setup"]
    size = s["size"]
    head = [
        f"# Speed: {s['model']} at {size['width']}x{size['height']}x{size['frames']} "
        f"(grid {'x'.join(map(str, s['token_grid']))}, {s['tokens']:,} tokens), {s['steps']} steps, "
        f"CFG batch {s['cfg_batch']}",
        "",
        f"A video is {s['dit_passes_per_video']} DiT passes ({s['steps']} steps"
        + (f" x {s['cfg_batch']} with CFG" if s["dit_passes_per_video"] > s["steps"] else "")
        + "); a DiT step is one forward on the CFG batch. End-to-end times state their own pass count.",
        "",
    ]
    if "device" in s:
        head.append(
            f"Device: {s['device']}; dtype {s['dtype']}; attention backend {s['attention_backend']}; "
            f"torch {s['torch']}; weights: {s['weights']}; warm-up {s['warmup']}, median of {s['repeats']}."
        )
    else:
        head.append(f"{s['measured']}; torch {s['torch']}.")
    lines = [
        *head,
        "",
        "| schedule | DiT step MACs | self-attention MACs | DiT step (ms) | attention (ms) | attention share "
        "| DiT step peak memory | end to end (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report["results"]:
        step = f"{row['dit_step_s']['median'] * 1e3:.1f}" if "dit_step_s" in row else "-"
        attention = f"{row['attention_s'] * 1e3:.1f}" if "attention_s" in row else "-"
        share = f"{row['attention_share']:.0%}" if "attention_share" in row else "-"
        memory = _bytes(row["dit_step_peak_memory_bytes"]) if "dit_step_peak_memory_bytes" in row else "-"
        e2e = row.get("e2e_s")
        e2e_cell = (
            f"{e2e['total']:.2f} ({e2e['dit_passes']} DiT passes)" if isinstance(e2e, dict) else (e2e or "-")
        )
        lines.append(
            f"| {row['schedule']} | {_macs(row['macs']['dit_step'])} | "
            f"{_macs(row['macs']['dit_step_self_attention'])} | {step} | {attention} | {share} | {memory} | "
            f"{e2e_cell} |"
        )
    for pair, ratio in report["ratios"].items():
        parts = ", ".join(f"{k} {v:.2f}x" for k, v in ratio.items())
        lines += ["", f"Ratios {pair} (> 1: the second is cheaper or faster): {parts}."]
    return "\n".join(lines) + "\n"


def run_speed(
    *,
    model: ModelPaths,
    schedule: Schedule,
    generation: GenerationSettings,
    speed: SpeedSettings,
    out_dir: str | os.PathLike,
) -> dict[str, Any]:
    """Dense vs ``schedule`` (just ``schedule`` if it is dense); writes ``speed.json`` and ``speed.md``."""
    dense = get_schedule("dense")
    schedules = [dense] if schedule.is_dense else [dense, schedule]
    report = measure_speed(model=model, schedules=schedules, generation=generation, speed=speed)
    out = Path(out_dir)
    write_json_atomic(out / "speed.json", report)
    write_text_atomic(out / "speed.md", speed_markdown(report))
    logger.info("wrote %s and %s", out / "speed.json", out / "speed.md")
    return report

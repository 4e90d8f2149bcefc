"""The kit's checks, in the order they run: one decorated function each (see `benchmarks.gpu.registry`).

Everything runs on random weights, in bfloat16 on the GPU (float32 on CPU), batch 1. Budgets are
wall-clock seconds on one H200, process start and imports included. They were sized before any GPU
run, from each check's FLOPs at an assumed 300-400 TFLOP/s for bf16 attention (the dense 4K
attention calls dominate: about 2.9 PFLOP per forward), with a third to spare; together they fit
the kit's 8-minute total, and `dit_wan22` runs last on what is left.
Where a full-size call costs tens of seconds (dense attention at 4K) it is timed once, after a
warm-up at a smaller size, and the rows say so.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import importlib.metadata
import math
import platform
import runpy
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.gpu.measure import GIB, BlockTimer, Measured, measure, random_dit
from benchmarks.gpu.registry import Context, check
from benchmarks.gpu.settings import REPO_ROOT, Setting, setting

# Slots per attention call for the "bounded" 4K inference of `memory` (test-sized: `TINY_TOKENS_PER_CALL`).
BOUNDED_TOKENS_PER_CALL = 65_536
TINY_TOKENS_PER_CALL = 256
PAPER_DIT_SPEEDUP = "21.4x (Wan2.1-1.3B at 4K, measured on an H20)"
SPEEDUP_TABLE = "DiT speed-up: measured vs MAC ratio"


def _dtype(ctx: Context) -> torch.dtype:
    return torch.bfloat16 if ctx.on_gpu else torch.float32


def _full_size(ctx: Context) -> bool:
    """Full-size shapes on a GPU: slow calls are timed once after a warm-up at a smaller size."""
    return ctx.on_gpu and not ctx.tiny


def _measure(ctx: Context, fn: Callable[[], Any], **kwargs: Any) -> Measured:
    """`measure` on the check's device; test-sized runs time one call (their figures mean nothing)."""
    return measure(fn, ctx.device, repeats=1 if ctx.tiny else 3, **kwargs)


def _attempt(fn: Callable[[], Measured]) -> Measured | str:
    """``fn()``, or ``"out of memory"`` when the device runs out (the row records it and the check goes on)."""
    try:
        return fn()
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "out of memory"


def _r(value: float) -> float:
    """``value`` to 4 significant digits: what the summary shows, and the precision of a timing."""
    return float(f"{value:.4g}")


def _ms(m: Measured | str | None) -> float | str | None:
    return m if not isinstance(m, Measured) else _r(m.median_s * 1e3)


def _gib(m: Measured | str | None) -> float | str | None:
    return m if not isinstance(m, Measured) else _r(m.peak_gib)


def _ratio(a: Measured | str | None, b: Measured | str | None) -> float | None:
    ok = isinstance(a, Measured) and isinstance(b, Measured)
    return _r(a.median_s / b.median_s) if ok else None


# --- 0. environment ---------------------------------------------------------------------------------------


def _git_commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (no git)"
    if head.returncode:
        return "unknown (not a git checkout)"
    return head.stdout.strip() + (" + local changes" if dirty.stdout.strip() else "")


def _driver() -> str | None:
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None


@check(budget_s=30, min_s=5)
def environment(ctx: Context) -> None:
    """Device, torch, CUDA and package versions of this run."""
    from t3.attention import flash_available
    from t3.profiling import device_name

    if ctx.device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device here: run the kit with --cpu (and --tiny for test-sized shapes)")
    row: dict[str, Any] = {"device": device_name(ctx.device)}
    if ctx.on_gpu:
        props = torch.cuda.get_device_properties(ctx.device)
        row["memory GiB"] = round(props.total_memory / GIB, 1)
        row["compute capability"] = f"{props.major}.{props.minor}"
        row["driver"] = _driver()
    row |= {
        "torch": torch.__version__,
        "CUDA (torch build)": torch.version.cuda,
        "cuDNN": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "flash-attn": "installed" if flash_available() else "absent",
    }
    for package in ("diffusers", "transformers", "lightning", "hydra-core", "peft"):
        try:
            row[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            row[package] = "absent"
    row["commit"] = _git_commit()
    row["date UTC"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M")
    ctx.emit("environment", row)


# --- 1. pytest -m gpu -------------------------------------------------------------------------------------


def _junit_cases(path: Path) -> list[dict[str, Any]]:
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                outcome, message = {"failure": "failed"}.get(tag, tag), found.get("message", "")
                break
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        cases.append(
            {"test": name, "outcome": outcome, "s": round(float(case.get("time", 0)), 3), "why": message}
        )
    return cases


@check(budget_s=45, min_s=15)
def pytest_gpu(ctx: Context) -> None:
    """`pytest -m gpu`: the tests that need a CUDA device (flash-attn ones skip, with the reason, where it is absent)."""
    files = sorted(
        str(p.relative_to(REPO_ROOT))
        for p in (REPO_ROOT / "tests").glob("test_*.py")
        if "mark.gpu" in p.read_text()
    )
    ctx.note(f"files with GPU tests: {', '.join(files)}")
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider"]
        proc = subprocess.run([*command, f"--junitxml={junit}", *files], cwd=REPO_ROOT)
        cases = _junit_cases(junit) if junit.is_file() else []
    for case in cases:
        ctx.emit("tests", case)
    counts = Counter(case["outcome"] for case in cases)
    ctx.emit("totals", {"collected": len(cases), **counts, "pytest exit code": proc.returncode})
    if proc.returncode != 0:
        raise RuntimeError(
            f"pytest -m gpu exited with {proc.returncode} ({dict(counts) or 'no tests collected'})"
        )


# --- 2. attention -----------------------------------------------------------------------------------------


@check(budget_s=110, min_s=30)
def attention(ctx: Context) -> None:
    """Attention: dense SDPA vs T3 vs the straightforward T3, every Wan2.1 4K plan, forward and forward+backward."""
    from benchmarks.attention import dense, training_step
    from t3.attention import choose_backend
    from t3.attention.flops import dense_attention_macs, plan_attention_macs
    from t3.models import get_spec

    s = setting("t3_4k", ctx.tiny)
    spec, grid, schedule = get_spec(s.facts.preset), s.facts.grid, s.facts.schedule
    heads, head_dim = int(spec.dit_config["num_attention_heads"]), int(spec.dit_config["attention_head_dim"])
    L = math.prod(grid)
    q, k, v = (torch.randn(1, L, heads, head_dim, device=ctx.device, dtype=_dtype(ctx)) for _ in range(3))
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    grad_out = torch.randn_like(q)
    backend = s.cfg.model.attention_backend
    ctx.note(
        f"{s.experiment} ({s.size}): grid {grid} = {L:,} tokens, {heads} heads x {head_dim}, {_dtype(ctx)}, "
        f"batch 1, schedule {schedule.name}, backend {choose_backend(backend, q)}. Times: median of up to 3 "
        "calls after a warm-up (1 call when a call takes over 1 s); peak: memory allocated by one call, "
        "inputs excluded. MAC ratio: dense MACs / T3 MACs; efficiency: measured speed-up / MAC ratio."
    )

    def forward(fn: Callable[..., torch.Tensor], warmup: bool = True) -> Measured | str:
        with torch.no_grad():
            return _attempt(lambda: _measure(ctx, functools.partial(fn, q, k, v), warmup=warmup))

    def train(fn: Callable[..., torch.Tensor], warmup: bool = True) -> Measured | str:
        step = functools.partial(training_step, functools.partial(fn, *leaves), leaves, grad_out)
        return _attempt(lambda: _measure(ctx, step, warmup=warmup))

    passes = {"forward": forward, "forward+backward": train}
    t3_rows = []
    for lp in schedule.plans(grid, schedule.period):
        op = functools.partial(_t3_op, grid=grid, plan=lp.plan, branches=lp.branches, backend=backend,
                               share_identical=schedule.share_identical_branches)  # fmt: skip
        t3_m = {name: run(op) for name, run in passes.items()}
        if lp.plan.needs_padding(grid):
            sf_m = dict.fromkeys(passes, "needs a divisible grid")
        else:
            sf = functools.partial(_straightforward, grid=grid, plan=lp.plan)
            sf_m = {name: run(sf) for name, run in passes.items()}
        mac_ratio = dense_attention_macs(L, heads, head_dim) / plan_attention_macs(
            grid, lp.plan, lp.computed, heads, head_dim
        )
        row = {"layer": lp.layer, "plan": str(lp.plan), "window": list(lp.plan.window(grid)),
               "branches": len(lp.computed), "MAC ratio": _r(mac_ratio)}  # fmt: skip
        for name, short in (("forward", "fwd"), ("forward+backward", "fwd+bwd")):
            row |= {
                f"{short} T3 ms": _ms(t3_m[name]), f"{short} straightf. ms": _ms(sf_m[name]),
                f"{short} T3 speed-up over straightf.": _ratio(sf_m[name], t3_m[name]),
                f"{short} T3 peak GiB": _gib(t3_m[name]), f"{short} straightf. peak GiB": _gib(sf_m[name]),
            }  # fmt: skip
        ctx.emit("T3 and the straightforward implementation, per plan", row)
        t3_rows.append((lp, mac_ratio, t3_m))

    # Dense last: at 4K it takes tens of seconds, and a budget cut then still leaves the T3 rows;
    # each pass is compared as soon as it is measured.
    big = _full_size(ctx)
    for name, run in passes.items():
        if big:  # warm the SDPA kernels up at 1/16 of the tokens, then time one full-size call
            cut = L // 16
            if name == "forward":
                with torch.no_grad():
                    dense(q[:, :cut], k[:, :cut], v[:, :cut])
            else:
                training_step(
                    functools.partial(dense, *(x[:, :cut] for x in leaves)), leaves, grad_out[:, :cut]
                )
        dense_m = run(dense, warmup=not big)
        timed = "1 call after a warm-up at 1/16 of the tokens" if big else "after a warm-up"
        ctx.emit("dense attention (SDPA)", {"pass": name, "tokens": L, "ms": _ms(dense_m),
                                            "peak GiB": _gib(dense_m), "timed": timed})  # fmt: skip
        t3_total = dense_total = macs_t3 = 0.0
        for lp, mac_ratio, t3_m in t3_rows:
            speedup = _ratio(dense_m, t3_m[name])
            ctx.emit(f"T3 vs dense, {name}", {
                "layer": lp.layer, "plan": str(lp.plan), "MAC ratio": _r(mac_ratio), "speed-up": speedup,
                "efficiency": None if speedup is None else _r(speedup / mac_ratio),
                "peak dense/T3": _ratio_peak(dense_m, t3_m[name]),
            })  # fmt: skip
            if speedup is not None:
                t3_total += t3_m[name].median_s  # type: ignore[union-attr]
                dense_total += dense_m.median_s  # type: ignore[union-attr]
                macs_t3 += 1 / mac_ratio
        if t3_total:  # the whole period: every plan once against dense once per layer
            ctx.emit(f"T3 vs dense, {name}", {
                "layer": "period", "plan": f"{len(t3_rows)} layers", "MAC ratio": _r(len(t3_rows) / macs_t3),
                "speed-up": _r(dense_total / t3_total),
                "efficiency": _r(dense_total / t3_total * macs_t3 / len(t3_rows)),
            })  # fmt: skip


def _t3_op(q, k, v, *, grid, plan, branches, backend, share_identical) -> torch.Tensor:  # noqa: ANN001
    from t3.attention import t3_attention

    return t3_attention(q, k, v, grid, plan, branches, backend, share_identical=share_identical)


def _straightforward(q, k, v, *, grid, plan) -> torch.Tensor:  # noqa: ANN001
    from t3.attention.reference import straightforward_t3_attention

    return straightforward_t3_attention(q, k, v, grid, plan)


def _ratio_peak(a: Measured | str, b: Measured | str) -> float | None:
    ok = isinstance(a, Measured) and isinstance(b, Measured) and b.peak_bytes > 0
    return _r(a.peak_bytes / b.peak_bytes) if ok else None  # type: ignore[union-attr]


# --- 3. DiT forward ---------------------------------------------------------------------------------------


def _dit_inputs(s: Setting, ctx: Context, shrink: int = 1) -> dict[str, torch.Tensor]:
    """Latents, timestep and text embeddings of one sample at ``s``'s size (``shrink``: H and W divided)."""
    from t3.models import get_spec

    spec = get_spec(s.facts.preset)
    c, t, h, w = s.facts.latent_shape
    dtype = _dtype(ctx)
    return {
        "hidden_states": torch.randn(1, c, t, h // shrink, w // shrink, device=ctx.device, dtype=dtype),
        "timestep": torch.full((1,), 500.0, device=ctx.device),
        "encoder_hidden_states": torch.randn(1, spec.text_len, spec.text_dim, device=ctx.device, dtype=dtype),
    }


def _forward(dit: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return dit(**inputs, return_dict=False)[0]


def _dit_row(
    label: str, m: Measured | str, timer: BlockTimer, macs: Any, blocks_scale: float = 1.0
) -> tuple[dict[str, Any], float | None]:
    """One row (forward time, its self-attention, peak, MACs) and the forward seconds.

    ``blocks_scale``: the timed forward ran ``1 / blocks_scale`` of the blocks; its block and
    self-attention times are scaled up, the embeddings and head (forward minus blocks) counted once.
    """
    row: dict[str, Any] = {"attention": label}
    if not isinstance(m, Measured):
        return row | {"forward s": m}, None
    blocks, attn = sum(timer.seconds("block")), sum(timer.seconds("attn1"))
    forward = m.median_s + (blocks_scale - 1) * blocks
    row |= {
        "forward s": _r(forward),
        "self-attention s": _r(blocks_scale * attn),
        "attention share": _r(blocks_scale * attn / forward),
        "peak GiB": _r(m.peak_gib),
        "DiT TMACs": _r(macs.total / 1e12),
        "self-attention TMACs": _r(macs.self_attention / 1e12),
        "timed": f"median of {m.repeats} after a warm-up" if m.repeats > 1 else "1 call after a warm-up",
    }
    return row, forward


def _dit_forward(ctx: Context, experiment: str, *, dense_one_period: bool) -> None:
    """Dense vs T3 forward of the experiment's DiT at its size (dense over one period and extrapolated,
    if asked), and the measured speed-up next to the MAC ratio."""
    import t3
    from t3.attention.flops import dit_macs

    s = setting(experiment, ctx.tiny)
    schedule, grid = s.facts.schedule, s.facts.grid
    dit = random_dit(s.facts.preset, ctx.device, _dtype(ctx)).eval().requires_grad_(False)
    inputs = _dit_inputs(s, ctx)
    forward = functools.partial(_forward, dit, inputs)
    macs_dense, macs_t3 = dit_macs(dit.config, grid), dit_macs(dit.config, grid, schedule=schedule)
    table = f"{s.facts.preset} at {s.size} (grid {'x'.join(map(str, grid))}, {math.prod(grid):,} tokens)"
    with BlockTimer(dit.blocks, ctx.device) as timer:
        t3.transform(dit, schedule, backend=s.cfg.model.attention_backend)
        m = _attempt(lambda: _measure(ctx, forward, around_timed=timer.recording))
        row, t3_s = _dit_row(f"T3 {schedule.name}", m, timer, macs_t3)
        ctx.emit(table, row)
        t3.untransform(dit)

        blocks, scale, label = dit.blocks, 1.0, "dense"
        if dense_one_period:
            dit.blocks = blocks[: schedule.period]
            scale = len(blocks) / schedule.period
            label = f"dense, extrapolated: {schedule.period} of {len(blocks)} blocks timed"
        big = _full_size(ctx)
        if big:  # load the kernels at 1/4 of the height and width, then time one full-size call
            _forward(dit, _dit_inputs(s, ctx, shrink=4))
        m = _attempt(lambda: _measure(ctx, forward, warmup=not big, around_timed=timer.recording))
        dit.blocks = blocks
        row, dense_s = _dit_row(label, m, timer, macs_dense, scale)
        if big:
            row["timed"] = "1 call after a warm-up at 1/16 of the tokens"
        ctx.emit(table, row)
    ctx.emit(SPEEDUP_TABLE, {
        "model": s.facts.preset, "size": s.size,
        "measured speed-up": _r(dense_s / t3_s) if dense_s and t3_s else None,
        "DiT MAC ratio": _r(macs_dense.total / macs_t3.total),
        "self-attention MAC ratio": _r(macs_dense.self_attention / macs_t3.self_attention),
        "dense": "extrapolated from one period" if dense_one_period else "measured, all blocks",
        "paper": PAPER_DIT_SPEEDUP if experiment == "t3_4k" and not ctx.tiny else "-",
    })  # fmt: skip
    del dit
    if ctx.on_gpu:
        torch.cuda.empty_cache()


@check(budget_s=140, min_s=40)
def dit(ctx: Context) -> None:
    """DiT: Wan2.1-1.3B forward at 720p (dense vs T3) and at 4K (T3 all blocks; dense one period, extrapolated)."""
    clock = "CUDA events" if ctx.on_gpu else "host clock readings"
    ctx.note(
        "Random weights, batch 1 (no CFG pair). Self-attention: the time inside every block's attn1 "
        f"(projections, norms, RoPE and attention), from {clock} around it; share: of the forward."
    )
    _dit_forward(ctx, "t3_720p", dense_one_period=False)
    _dit_forward(ctx, "t3_4k", dense_one_period=True)


# --- 4. memory --------------------------------------------------------------------------------------------


@check(budget_s=100, min_s=40)
def memory(ctx: Context) -> None:
    """Memory: a training step over one period of blocks vs the dry-run formulas (1088p, 4K); 4K inference with bounded tokens_per_call."""
    from omegaconf import OmegaConf

    import t3
    from t3.models.build import cast_dit
    from t3.training.optim import build_optimizer

    # A quarter of the 4K tokens first (a figure even if 4K runs out of memory), then 4K.
    sizes = [setting("t3_4k", ctx.tiny, [*MEMORY_OVERRIDES, *_quarter_size(ctx)]),
             setting("t3_4k", ctx.tiny, MEMORY_OVERRIDES)]  # fmt: skip
    s4k = sizes[-1]
    facts, period = s4k.facts, s4k.facts.schedule.period
    # bf16-mixed as Lightning runs it: bf16 autocast over float32 weights (also on CPU, where the
    # test-sized run then covers the autocast path the GPU takes).
    bf16 = "bf16" in s4k.cfg.trainer.precision
    dit = random_dit(facts.preset, ctx.device, num_layers=period)
    dit.enable_gradient_checkpointing()
    dit.train()
    optimizer = build_optimizer(dit.parameters(), OmegaConf.to_object(s4k.cfg.optim))  # type: ignore[arg-type]
    ctx.note(
        f"{period} of {facts.num_layers} blocks of {facts.preset} (one period of the schedule), per-block "
        f"gradient checkpointing, float32 weights{' under bf16 autocast' if bf16 else ''}, AdamW, 1 device; "
        f"{sum(p.numel() for p in dit.parameters()):,} parameters. Predicted: the dry-run formulas "
        "(t3/memory.py: state_memory, activation_memory) for this setting. Measured peak: the "
        "second of two steps (AdamW state exists), every live tensor (weights, AdamW, gradients, "
        "activations, inputs)."
    )
    for size in sizes:
        t3.transform(dit, size.facts.schedule, backend=size.cfg.model.attention_backend)
        for offload in (False, True):
            row = _training_step_memory(ctx, size, dit, optimizer, bf16=bf16, offload=offload)
            ctx.emit("training step, one period of blocks", row)

    # Inference at 4K: bf16 weights, no autograd; default vs bounded slots per attention call.
    optimizer.state.clear()  # frees the AdamW moments
    dit.disable_gradient_checkpointing()
    dit.eval().requires_grad_(False)
    if ctx.on_gpu:
        cast_dit(dit, torch.bfloat16)
        torch.cuda.empty_cache()
    inputs = _dit_inputs(s4k, ctx)
    bound = TINY_TOKENS_PER_CALL if ctx.tiny else BOUNDED_TOKENS_PER_CALL
    for tokens_per_call in (None, bound):
        t3.transform(
            dit, facts.schedule, backend=s4k.cfg.model.attention_backend, tokens_per_call=tokens_per_call
        )
        m = _attempt(lambda: _measure(ctx, functools.partial(_forward, dit, inputs), warmup=False))
        ctx.emit(f"inference forward at {s4k.size}, one period of blocks", {
            "tokens_per_call": "default" if tokens_per_call is None else tokens_per_call,
            "peak above weights GiB": _gib(m), "forward s (1 call)": None if isinstance(m, str) else _r(m.median_s),
        })  # fmt: skip


# One device, as measured: Lightning's single-device strategy (the experiment's is DeepSpeed on 8 GPUs).
MEMORY_OVERRIDES = ["strategy=auto", "trainer.devices=1"]


def _quarter_size(ctx: Context) -> list[str]:
    """Overrides for a quarter of the 4K tokens (grid 21x68x120; test-sized: 6x4x6)."""
    size = ["data.height=64", "data.width=96"] if ctx.tiny else ["data.height=1088", "data.width=1920"]
    return ["t3=wan21_windows", *size]


def _training_step_memory(
    ctx: Context,
    s: Setting,
    dit: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    bf16: bool,
    offload: bool,
) -> dict[str, Any]:
    """Peak memory of one training step of ``dit`` at ``s``'s size next to the dry-run prediction."""
    from omegaconf import OmegaConf

    from t3.memory import activation_memory, state_memory
    from t3.models import get_spec

    facts, spec = s.facts, get_spec(s.facts.preset)
    period = len(dit.blocks)
    weights, grads, opt_state, _ = state_memory(
        num_params=sum(p.numel() for p in dit.parameters()),
        num_trainable=sum(p.numel() for p in dit.parameters() if p.requires_grad),
        strategy=OmegaConf.to_object(s.cfg.strategy), world_size=1, bf16=bf16,  # type: ignore[arg-type]
    )  # fmt: skip
    act_gpu, act_cpu = activation_memory(
        tokens=math.prod(facts.grid), dim=spec.dim, ffn_dim=int(spec.dit_config["ffn_dim"]), num_layers=period,
        micro_batch=1, bytes_per_value=2 if bf16 else 4, checkpointing=True, offload=offload,
        branches=max(len(lp.computed) for lp in facts.schedule.plans(facts.grid, period)),
    )  # fmt: skip
    inputs = {k: v.float() if v.is_floating_point() else v for k, v in _dit_inputs(s, ctx).items()}
    target = torch.randn_like(inputs["hidden_states"])

    def step() -> None:
        saving = (
            torch.autograd.graph.save_on_cpu(pin_memory=ctx.on_gpu) if offload else contextlib.nullcontext()
        )
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=bf16), saving:
            out = dit(**inputs, return_dict=False)[0]
            loss = (out.float() - target).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    try:
        step()  # the first step allocates the AdamW state
        resident = _live_bytes(
            ctx.device, [*dit.parameters(), *dit.buffers(), *inputs.values(), target], optimizer
        )
        m: Measured | str = _measure(ctx, step, warmup=False)
    except torch.OutOfMemoryError:
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        m, resident = "out of memory", 0
    predicted = weights + grads + opt_state + act_gpu
    measured = None if isinstance(m, str) else resident + m.peak_bytes
    return {
        "size": s.size, "tokens": math.prod(facts.grid), "activation offload": offload,
        "measured peak GiB": m if measured is None else _r(measured / GIB),
        "predicted GiB": _r(predicted / GIB),
        "measured / predicted": None if measured is None else _r(measured / predicted),
        "step above resident GiB": None if measured is None else _r(m.peak_gib),  # type: ignore[union-attr]
        "predicted activations + grads GiB": _r((act_gpu + grads) / GIB),
        "resident GiB (weights, AdamW, inputs)": None if measured is None else _r(resident / GIB),
        "predicted weights + AdamW GiB": _r((weights + opt_state) / GIB),
        "predicted offloaded GiB": _r(act_cpu / GIB),
        "step s": None if measured is None else _r(m.median_s),  # type: ignore[union-attr]
    }  # fmt: skip


def _live_bytes(device: torch.device, tensors: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> int:
    """Allocated bytes now: the allocator's count on CUDA; ``tensors``, their gradients and the
    optimizer state on CPU (which keeps no count)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device)
    tensors = tensors + [t.grad for t in tensors if t.grad is not None]
    tensors += [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors)


# --- 5. Lightning -----------------------------------------------------------------------------------------


@check(budget_s=75, min_s=30)
def lightning(ctx: Context) -> None:
    """Lightning: 3 training steps of the tiny model through train.py (bf16-mixed on the GPU)."""
    from t3.summary import read_run_summary

    with tempfile.TemporaryDirectory(prefix="t3-kit-") as tmp:
        overrides = [
            "~experiment", "trainer=gpu" if ctx.on_gpu else "trainer=cpu", "trainer.devices=1",
            "trainer.max_steps=3", "experiment_name=kit_lightning", f"paths.output_dir={tmp}",
            f"paths.cache_dir={tmp}/cache", "validation.every_n_steps=0", "export.formats=[diffusers]",
        ]  # fmt: skip
        if ctx.tiny:  # one sample per step, few to encode: seconds on a CPU
            overrides += ["batch.global_size=1", "data.train.num_samples=4"]
        ctx.note(
            "python train.py "
            + " ".join(o for o in overrides if tmp not in o)
            + " (outputs in a temporary folder)"
        )
        argv = sys.argv
        sys.argv = [str(REPO_ROOT / "train.py"), *overrides]
        try:
            runpy.run_path(str(REPO_ROOT / "train.py"), run_name="__main__")
        except SystemExit as err:
            if err.code not in (None, 0):
                raise RuntimeError(f"train.py exited with {err.code}") from None
        finally:
            sys.argv = argv
        summary = read_run_summary(Path(tmp) / "kit_lightning")
    metrics, speed = summary["metrics"], summary["speed"]
    loss = metrics.get("train/loss")
    ctx.emit(
        "training run",
        {
            "status": summary["status"], "trainer": overrides[1], "steps": 3, "final loss": loss,
            "step s (median)": speed.get("perf/step_time_s"), "device": speed.get("device"),
        },
    )  # fmt: skip
    if summary["status"] != "completed" or loss is None or not math.isfinite(loss):
        raise RuntimeError(f"training run {summary['status']} with loss {loss}: {summary.get('error')}")
    if ctx.on_gpu and str(speed.get("device", "")).startswith("CPU"):
        raise RuntimeError(f"trainer=gpu trained on {speed.get('device')}")


# --- 6. sequence parallelism at sp=1 ---------------------------------------------------------------------

#: Largest accepted ``max |SP - plain| / max |plain|`` of the forward outputs: the SP path computes the
#: same groups in another batching, so bf16 rounding differs slightly; float32 must agree to rounding.
SP_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


@check(budget_s=45, min_s=20)
def sequence_parallel(ctx: Context) -> None:
    """Sequence parallelism on one GPU (sp=1): the SP path's forward equals the plain T3 forward; its overhead."""
    import torch.distributed as dist

    import t3
    from t3.parallel import apply_sequence_parallel, remove_sequence_parallel, sequence_parallel_state

    # A one-rank group on the check's device: the SP hooks, index maps and collectives run on CUDA (NCCL)
    # exactly as in a multi-GPU run, with nothing to exchange.
    backend = "nccl" if ctx.on_gpu else "gloo"
    if ctx.on_gpu:
        torch.cuda.set_device(ctx.device)
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        s = setting("t3_720p", ctx.tiny)
        grid = s.facts.grid
        dtype = _dtype(ctx)
        dit = random_dit(s.facts.preset, ctx.device, dtype).eval().requires_grad_(False)
        t3.transform(dit, s.facts.schedule, backend=s.cfg.model.attention_backend)
        inputs = _dit_inputs(s, ctx)
        forward = functools.partial(_forward, dit, inputs)
        plain_out = forward()
        plain = _attempt(lambda: _measure(ctx, forward))
        apply_sequence_parallel(dit, dist.new_group([0]))
        if sequence_parallel_state(dit) is None:  # a one-rank group must still take the SP path
            raise RuntimeError("apply_sequence_parallel left the model without its SP hooks")
        sp_out = forward()
        with_sp = _attempt(lambda: _measure(ctx, forward))
        remove_sequence_parallel(dit)
        difference = float((sp_out.float() - plain_out.float()).abs().max() / plain_out.float().abs().max())
        table = f"{s.facts.preset} at {s.size} (grid {'x'.join(map(str, grid))}), T3 {s.facts.schedule.name}"
        ctx.emit(table, {
            "plain forward ms": _ms(plain), "SP forward ms (sp=1)": _ms(with_sp),
            "SP / plain time": _ratio(with_sp, plain),
            "plain peak GiB": _gib(plain), "SP peak GiB": _gib(with_sp),
            "max |SP - plain| / max |plain|": float(f"{difference:.3g}"), "dtype": str(dtype).removeprefix("torch."),
        })  # fmt: skip
        if not difference <= SP_TOLERANCE[dtype]:
            raise RuntimeError(
                f"sp=1 forward differs from the plain forward by {difference:.3g} (relative), "
                f"over the {SP_TOLERANCE[dtype]:g} accepted in {dtype}"
            )
    finally:
        dist.destroy_process_group()


# --- 7. Wan2.2 (last: runs on whatever time is left) ------------------------------------------------------


@check(budget_s=90, min_s=45)
def dit_wan22(ctx: Context) -> None:
    """DiT: Wan2.2-5B forward at 4K (T3 all blocks; dense one period, extrapolated), if time allows."""
    _dit_forward(ctx, "t3_4k_wan22", dense_one_period=True)

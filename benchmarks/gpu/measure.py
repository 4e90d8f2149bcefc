"""Measuring on a short lease: timed calls with their peak memory, random DiTs, per-block times.

Every second of device time counts, so a call is timed together with its peak memory (on CUDA the
allocator's peak over the timed calls; on CPU, where that needs a tracking pass, one extra call),
and a slow call is repeated less (`measure`). `random_dit` builds a Wan DiT with random weights
directly on the device in the compute dtype (no CPU initialisation, no checkpoint). `BlockTimer`
times every block and its self-attention inside one forward with hooks (CUDA events on a GPU).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from t3.profiling import peak_memory_bytes

__all__ = ["GIB", "BlockTimer", "Measured", "measure", "random_dit"]

GIB = 2**30

#: A call slower than this (first, untimed run) is timed once instead of `measure`'s ``repeats``.
SLOW_CALL_S = 1.0


@dataclass(frozen=True)
class Measured:
    """Median and fastest seconds of ``repeats`` timed calls, and the peak bytes one call allocated."""

    median_s: float
    min_s: float
    repeats: int
    peak_bytes: int

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    fn: Callable[[], Any],
    device: torch.device,
    *,
    repeats: int = 3,
    warmup: bool = True,
    around_timed: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> Measured:
    """Time ``fn()`` after one untimed warm-up call (fewer repeats if it is slow) and take its peak memory.

    Args:
        fn: The call; its result is dropped.
        device: Where it runs.
        repeats: Timed calls if the warm-up took under `SLOW_CALL_S` (else one).
        warmup: False skips the warm-up, e.g. when the same kernels just ran at a smaller size and
            a full-size call costs many seconds; the one timed call then includes any first-call cost.
        around_timed: A context entered around the timed calls only (e.g. `BlockTimer.recording`).

    Peak bytes: allocated by one call beyond what was allocated before it (inputs excluded). On CPU
    they come from the warm-up call, run under `t3.profiling.TensorMemoryTracker`, or from one extra
    call without a warm-up.
    """
    peak = None
    if warmup:
        _sync(device)
        start = time.perf_counter()
        if device.type == "cuda":
            fn()
        else:
            peak = peak_memory_bytes(fn, device)
        _sync(device)
        if time.perf_counter() - start > SLOW_CALL_S:
            repeats = 1
    else:
        repeats = 1
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times = []
    with around_timed() if around_timed is not None else contextlib.nullcontext():
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
    elif peak is None:
        peak = peak_memory_bytes(fn, device)
    return Measured(statistics.median(times), min(times), repeats, peak)


def random_dit(
    preset: str, device: torch.device, dtype: torch.dtype | None = None, *, num_layers: int | None = None
) -> nn.Module:
    """A ``WanTransformer3DModel`` of ``preset`` with random weights, built on ``device``.

    Args:
        preset: `t3.models.presets` name.
        device: Parameters are created (and initialised) there: seconds for 5B parameters on a GPU.
        dtype: Cast to this compute dtype keeping diffusers' fp32 modules, as loading does; None
            keeps float32 (mixed-precision training).
        num_layers: Fewer blocks than the preset (e.g. one period of the T3 schedule).
    """
    from t3.models.build import cast_dit, dit_from_preset

    dit = dit_from_preset(preset, device=device, seed=0, num_layers=num_layers)
    if dtype is not None:
        cast_dit(dit, dtype)
    return dit


class BlockTimer:
    """Seconds spent in each of ``blocks`` and in its self-attention (``attn1``) during forwards.

    Hooks around every block and its ``attn1`` record CUDA events (no synchronisation inside the
    forward) or host times on CPU, while `recording` is entered. ``attn1`` includes its q/k/v/out
    projections, norms and RoPE. Use as a context manager (it installs and removes the hooks).
    """

    def __init__(self, blocks: Sequence[nn.Module], device: torch.device) -> None:
        self.blocks = list(blocks)
        self.device = device
        self._handles: list[Any] = []
        self._marks: dict[tuple[str, int], list[Any]] = {}
        self._on = False

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Record the forwards run inside this context (earlier records are dropped)."""
        self._marks.clear()
        self._on = True
        try:
            yield
        finally:
            self._on = False

    def _stamp(self) -> Any:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _hooks(self, module: nn.Module, key: tuple[str, int]) -> None:
        def before(*_: Any) -> None:
            if self._on:
                self._marks.setdefault(key, []).append(self._stamp())

        def after(*_: Any) -> None:
            if self._on:
                self._marks[key].append(self._stamp())

        self._handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]

    def __enter__(self) -> BlockTimer:
        for i, block in enumerate(self.blocks):
            self._hooks(block, ("block", i))
            self._hooks(block.attn1, ("attn1", i))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def seconds(self, what: str) -> list[float]:
        """Per block (``what`` = ``"block"`` or ``"attn1"``): mean seconds per recorded forward."""
        _sync(self.device)
        out = []
        for i in range(len(self.blocks)):
            marks = self._marks.get((what, i), [])
            pairs = zip(marks[0::2], marks[1::2], strict=True)
            if self.device.type == "cuda":
                spans = [a.elapsed_time(b) / 1e3 for a, b in pairs]
            else:
                spans = [b - a for a, b in pairs]
            out.append(sum(spans) / max(1, len(spans)))
        return out

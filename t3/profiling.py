"""Latency and peak-memory measurement shared by benchmarks and the eval speed stage.

On CUDA, peak memory is the caching allocator's ``max_memory_allocated`` during the call. On CPU,
PyTorch keeps no allocator statistics, so `TensorMemoryTracker` counts the bytes of every tensor
storage that an operator creates during the call and frees it when the storage dies: the peak of
live tensor memory allocated by the call (inputs excluded). Both are reported with the device named.
"""

from __future__ import annotations

import statistics
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class TensorMemoryTracker(TorchDispatchMode):
    """Peak bytes of live tensor storages created by operators while the mode is active."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        if key in self._live:
            self._live.discard(key)
            self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        # Outputs that share an argument's storage (views, in-place results) allocate nothing.
        arg_storages = {
            t.untyped_storage().data_ptr()
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor) and t.device.type != "meta"
        }
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in self._live or key in arg_storages or storage.nbytes() == 0:
                continue
            nbytes = storage.nbytes()
            self._live.add(key)
            self.current += nbytes
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._free, key, nbytes)
        return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_bytes(fn: Callable[[], Any], device: torch.device | str) -> int:
    """Peak bytes allocated while running ``fn()`` once (its result is dropped before returning)."""
    device = torch.device(device)
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        result = fn()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del result
        return peak
    with TensorMemoryTracker() as tracker:
        result = fn()
        del result
    return tracker.peak


def saved_for_backward_bytes(
    fn: Callable[[], torch.Tensor], inputs: tuple[torch.Tensor, ...], device: torch.device | str
) -> int:
    """Bytes that autograd holds between the forward and the backward of ``fn()``.

    ``inputs`` are the leaf tensors ``fn`` reads; they are made to require grad for the call (and
    restored after). Reported: the live tensor memory allocated by the forward minus its output, i.e.
    the activation memory this computation adds to a training step.
    """
    device = torch.device(device)
    previous = [t.requires_grad for t in inputs]
    try:
        for t in inputs:
            t.requires_grad_(True)
        with torch.enable_grad():
            if device.type == "cuda":
                _sync(device)
                base = torch.cuda.memory_allocated(device)
                out = fn()
                _sync(device)
                return torch.cuda.memory_allocated(device) - base - out.untyped_storage().nbytes()
            with TensorMemoryTracker() as tracker:
                out = fn()
                return tracker.current - out.untyped_storage().nbytes()
    finally:
        for t, flag in zip(inputs, previous, strict=True):
            t.requires_grad_(flag)


@dataclass(frozen=True)
class Timing:
    median_s: float
    min_s: float
    repeats: int


def time_call(
    fn: Callable[[], Any], device: torch.device | str, *, warmup: int = 1, repeats: int = 3
) -> Timing:
    """Median and minimum wall time of ``fn()`` after ``warmup`` untimed calls (CUDA-synchronised)."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return Timing(median_s=statistics.median(times), min_s=min(times), repeats=repeats)


def device_name(device: torch.device | str) -> str:
    """A human-readable name of the device that figures were measured on."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model
            )
    except OSError:
        pass
    return f"CPU {model} ({torch.get_num_threads()} threads)"

"""Sequence parallelism on 2 and 4 CPU processes (gloo): whole tiny DiTs equal one process.

Each process runs `tests.sp_worker`: the SP forward output and, after the engine-style gradient
average over all ranks (with `t3.parallel.loss_scale`), the gradient of every parameter must equal the
single-process ones (float32, 1e-5 relative). Cases cover a tiny Wan2.1 layout (3 heads: 2 and 4 do not
divide them) and a tiny Wan2.2-TI2V layout (48 latent channels, per-token timesteps, 6 heads), dense and
T3 schedules, token counts divisible and not divisible by ``sp``, frame-aligned shards, gradient
checkpointing, and data parallelism over SP groups.
"""

from __future__ import annotations

import socket

import pytest
import torch.multiprocessing as mp

from .sp_worker import MIXED, WAN21_TINY, WAN22_TINY, Case, worker

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one():
    cases = [
        # grid (5, 3, 5): 75 tokens over 2 ranks (38 + 37, padded), windows with padding, 3 heads
        Case("wan2.1 T3, odd tokens", WAN21_TINY, MIXED, (5, 6, 10)),
        Case("wan2.1 dense", WAN21_TINY, "dense", (4, 8, 12)),
        # 5 frames on frame boundaries: 3 + 2 frames (padded shards), per-token timesteps
        Case(
            "wan2.2 T3, frame shards, checkpointing", WAN22_TINY, MIXED, (5, 8, 12),
            per_token_timestep=True, align="frames", checkpointing=True,
        ),
    ]  # fmt: skip
    mp.spawn(worker, args=(2, _free_port(), [(2, cases)]), nprocs=2)


def test_four_processes_equal_one():
    sp4 = [
        Case("wan2.1 T3, odd tokens", WAN21_TINY, MIXED, (5, 6, 10)),  # 19, 19, 19, 18 tokens
        Case("wan2.2 T3", WAN22_TINY, MIXED, (5, 8, 12), per_token_timestep=True),
        Case("wan2.2 dense", WAN22_TINY, "dense", (3, 6, 8), per_token_timestep=True),
    ]
    # sp = 2 x data parallel 2: each SP group its own sample; engines dividing by the world or dp size.
    sp2_dp2 = [Case("wan2.1 T3, dp 2", WAN21_TINY, MIXED, (5, 6, 10), divisors=("world", "dp"))]
    mp.spawn(worker, args=(4, _free_port(), [(4, sp4), (2, sp2_dp2)]), nprocs=4)

"""Worker of the multi-process sequence-parallel tests (`tests/test_parallel_distributed.py`).

Each process runs every case: it builds the same tiny DiT, computes the single-process reference
(output and parameter gradients of every data-parallel sample) itself, then runs its shard under
`t3.parallel`, reduces the gradients over all ranks as DDP / ZeRO / FSDP2 do (sum, then divide), and
compares. float32 on CPU; the tolerance is 1e-5 relative to each tensor's largest value.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from diffusers import WanTransformer3DModel

import t3
from t3.attention import build_schedule, t3_attention
from t3.models.presets import dit_config
from t3.parallel import (
    ParallelGroups,
    apply_sequence_parallel,
    build_parallel_groups,
    loss_scale,
    sequence_parallel_attention,
    shard_layout,
)

RTOL = 1e-5

# Tiny Wan2.1 layout (4 latent channels, one timestep per sample) with 3 heads: neither 2 nor 4 divides them.
WAN21_TINY = {**dit_config("tiny"), "num_attention_heads": 3}
# Tiny Wan2.2-TI2V layout: 48 latent channels, patch (1, 2, 2), one timestep per token; 6 heads (4 does not divide).
WAN22_TINY = {**dit_config("tiny"), "num_attention_heads": 6, "in_channels": 48, "out_channels": 48}

# Five layers: whole frames, spread windows with padding, time windows, dense, padded 3D windows.
MIXED = build_schedule("mixed", pieces=[(5, 1, 1), (1, 2, 3), (2, 2, 2), (1, 1, 1), (3, 2, 4)])


@dataclass(frozen=True)
class Case:
    name: str
    config: dict
    schedule: object  # a Schedule or a preset name
    latent: tuple[int, int, int]  # latent frames, height, width (the grid is that / patch)
    per_token_timestep: bool = False
    align: str = "tokens"
    checkpointing: bool = False
    divisors: tuple[str, ...] = field(default=("world",))  # engine gradient divisors to check


def _inputs(case: Case, sample: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + sample)
    c = case.config["in_channels"]
    f, h, w = case.latent
    x = torch.randn(1, c, f, h, w, generator=g)
    tokens = f * (h // 2) * (w // 2)
    if case.per_token_timestep:
        t = torch.rand(1, tokens, generator=g) * 1000
    else:
        t = torch.rand(1, generator=g) * 1000
    text = torch.randn(1, 7, case.config["text_dim"], generator=g)
    return x, t, text


def _loss(out: torch.Tensor) -> torch.Tensor:
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    return (out * weight).sum() / out.numel() ** 0.5


def _model(case: Case) -> WanTransformer3DModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = WanTransformer3DModel(**case.config)
    t3.transform(model, case.schedule)
    if case.checkpointing:
        model.enable_gradient_checkpointing()
    return model.train()


def _close(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    scale = float(ref.abs().max())
    err = float((got - ref).abs().max())
    assert err <= RTOL * max(scale, 1e-12), f"{what}: max error {err:.3e} > {RTOL} x {scale:.3e}"


def run_case(case: Case, groups: ParallelGroups) -> None:
    sp, world = groups.sp_size, groups.world_size
    reference = _model(case)
    ref_out, ref_grads = [], []
    for sample in range(groups.dp_size):
        reference.zero_grad()
        out = reference(*_inputs(case, sample)).sample
        _loss(out).backward()
        ref_out.append(out.detach())
        ref_grads.append({n: p.grad.clone() for n, p in reference.named_parameters()})
    mean_grad = {n: sum(g[n] for g in ref_grads) / groups.dp_size for n in ref_grads[0]}

    for divisor_name in case.divisors:
        divisor = world if divisor_name == "world" else groups.dp_size
        model = apply_sequence_parallel(copy.deepcopy(reference), groups.sp_group, align=case.align)
        model.zero_grad()
        out = model(*_inputs(case, groups.dp_rank)).sample
        _close(out.detach(), ref_out[groups.dp_rank], f"{case.name} sp={sp}: output")
        (_loss(out) * loss_scale(world, sp, divisor)).backward()
        for name, p in model.named_parameters():
            grad = p.grad.clone()
            dist.all_reduce(grad)  # the engine's reduction: sum over all ranks ...
            grad /= divisor  # ... divided by its divisor
            _close(grad, mean_grad[name], f"{case.name} sp={sp} divisor={divisor_name}: grad of {name}")


def check_bf16_autocast(groups: ParallelGroups) -> None:
    """Under bf16 autocast (bf16-mixed training: float32 q, k from RMSNorm, bf16 v) SP attention
    runs in bf16 like `t3_attention` and SDPA, and stays as close to it as bf16 allows."""
    grid, plan = (5, 3, 5), MIXED.rules[1].plan((5, 3, 5))
    layout = shard_layout(grid, groups.sp_size)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 75, 3, 16, generator=g) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = t3_attention(q, k, v.bfloat16(), grid, plan, backend="sdpa")
        out = sequence_parallel_attention(
            *(layout.shard(x, groups.sp_rank) for x in (q, k, v.bfloat16())), grid, plan, backend="sdpa",
            layout=layout, group=groups.sp_group,
        )  # fmt: skip
    assert out.dtype == torch.bfloat16, f"SP attention under bf16 autocast returned {out.dtype}"
    mine = layout.shard(ref, groups.sp_rank)[:, : layout.counts[groups.sp_rank]]
    torch.testing.assert_close(out[:, : mine.shape[1]].float(), mine.float(), atol=2e-2, rtol=2e-2)


def worker(rank: int, world: int, port: int, runs: list[tuple[int, list[Case]]]) -> None:
    """One process: for each ``(sp, cases)`` of ``runs``, every case with SP groups of ``sp`` ranks."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for sp, cases in runs:
            groups = build_parallel_groups(sp)
            check_bf16_autocast(groups)
            for case in cases:
                run_case(case, groups)
    finally:
        dist.destroy_process_group()

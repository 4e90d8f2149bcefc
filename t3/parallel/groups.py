"""Process groups for sequence parallelism: SP groups of consecutive ranks, data parallel across them.

With ``world`` ranks and SP size ``sp``, ranks ``k * sp .. (k + 1) * sp - 1`` form SP group ``k``
(consecutive ranks share a node on a cluster, where the per-layer exchange is fastest) and hold the
shards of one sample; the ``world / sp`` SP groups are the data-parallel replicas: rank ``r`` reads the
samples of data-parallel rank ``r // sp`` out of ``world / sp``. Ranks with the same position in their
SP groups form a data-parallel group (for engines or checks that reduce over replicas only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from t3.parallel.layout import SP_KEY


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_world(world_size: int, sp: int) -> None:
    """Fail with one line if ``sp`` ranks per SP group cannot tile ``world_size`` ranks."""
    if isinstance(sp, bool) or not isinstance(sp, int) or sp < 1:
        raise ValueError(f"{SP_KEY} must be an integer >= 1, got {sp!r}")
    if world_size % sp:
        raise ValueError(
            f"{SP_KEY}={sp} does not divide the world size {world_size} "
            f"(accepted: a divisor of {world_size}: {', '.join(map(str, _divisors(world_size)))})"
        )


def data_parallel_rank(rank: int, world_size: int, sp: int) -> tuple[int, int]:
    """``(dp_rank, dp_size)`` of global ``rank``: which sample stream it reads, out of how many.

    The one place that maps ranks to data-parallel replicas (samplers, streaming readers, validation
    slices and `build_parallel_groups` all ask here): the ``sp`` consecutive ranks of an SP group share
    one stream.
    """
    check_world(world_size, sp)
    return rank // sp, world_size // sp


def group_ranks(world_size: int, sp: int) -> tuple[list[list[int]], list[list[int]]]:
    """``(sp_groups, dp_groups)``: the ranks of every SP group and of every data-parallel group."""
    check_world(world_size, sp)
    sp_groups = [list(range(k * sp, (k + 1) * sp)) for k in range(world_size // sp)]
    dp_groups = [list(range(i, world_size, sp)) for i in range(sp)]
    return sp_groups, dp_groups


@dataclass(frozen=True)
class ParallelGroups:
    """This rank's place in the (data parallel) x (sequence parallel) grid of ranks.

    Attributes:
        sp_size, sp_rank: ranks per SP group and this rank's position in its group.
        dp_size, dp_rank: SP groups (data-parallel replicas) and this rank's group: the sample stream
            to read (every rank of an SP group reads the same samples, noise and timesteps).
        sp_group: the process group of this rank's SP group (None when ``sp_size == 1``).
        dp_group: the process group of the ranks at this rank's position in every SP group.
    """

    sp_size: int
    sp_rank: int
    dp_size: int
    dp_rank: int
    sp_group: dist.ProcessGroup | None
    dp_group: dist.ProcessGroup | None

    @property
    def world_size(self) -> int:
        return self.sp_size * self.dp_size


def build_parallel_groups(sp: int) -> ParallelGroups:
    """Create the SP and data-parallel process groups of the initialised default group.

    Every rank must call this together (``dist.new_group`` is collective), after
    ``dist.init_process_group`` and before any model is built.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{SP_KEY}={sp} needs torch.distributed initialised (launch with torchrun)")
    world, rank = dist.get_world_size(), dist.get_rank()
    sp_groups, dp_groups = group_ranks(world, sp)
    sp_group = dp_group = None
    for ranks in sp_groups:
        created = dist.new_group(ranks) if sp > 1 else None
        if rank in ranks:
            sp_group = created
    for ranks in dp_groups:
        created = dist.new_group(ranks)
        if rank in ranks:
            dp_group = created
    dp_rank, dp_size = data_parallel_rank(rank, world, sp)
    return ParallelGroups(
        sp_size=sp,
        sp_rank=rank % sp,
        dp_size=dp_size,
        dp_rank=dp_rank,
        sp_group=sp_group,
        dp_group=dp_group,
    )

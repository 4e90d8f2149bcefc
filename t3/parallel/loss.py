"""The loss scale under sequence parallelism: how each rank's loss must be weighted so that the training
engine's own data-parallel gradient reduction yields the data-parallel mean of full-sample gradients.

The rule, with ``W`` ranks, SP groups of ``sp`` ranks and ``dp = W / sp`` of them:

1. Every rank of an SP group gets the same sample, noise and timestep, runs the model (whose output
   `t3.parallel.comm.gather_tokens` assembles on every rank) and computes the loss ``l`` of the whole
   sample. The ``sp`` losses of a group are identical.
2. Backward: the gather's backward sums, for each shard, the gradients of all ``sp`` identical losses,
   so the gradients the group's ranks hold add up to ``sp * grad(l)``; each rank holds only the part
   that flowed through its shard (and through the exchanges of the other ranks' attention).
3. The engine (DDP, DeepSpeed ZeRO, FSDP2) sums every parameter's gradient over all ``W`` ranks and
   divides by ``R`` (``R = W`` for all of them as t3 configures them). The result is
   ``(sp / R) * sum over SP groups of grad(l_group)``.

The data-parallel mean is ``(1 / dp) * sum over SP groups of grad(l_group)``, so each rank's loss is
multiplied by ``R / (sp * dp) = R / W``: **1 for engines that average over all ranks**, i.e. the loss
is used as it is, and the logged loss is the sample's loss. Global batch = micro-batch x ``dp`` x
accumulation steps.
"""

from __future__ import annotations

from t3.parallel.groups import check_world


def loss_scale(world_size: int, sp: int, gradient_divisor: int | None = None) -> float:
    """Factor on each rank's full-sample loss (see the module docstring).

    Args:
        world_size: all ranks ``W``.
        sp: ranks per SP group (must divide ``world_size``).
        gradient_divisor: what the engine divides the gradient sum over all ranks by; default
            ``world_size`` (DDP, DeepSpeed ZeRO, FSDP2 averaging over every rank).

    Returns:
        ``gradient_divisor / world_size``.
    """
    check_world(world_size, sp)
    divisor = world_size if gradient_divisor is None else gradient_divisor
    if isinstance(divisor, bool) or not isinstance(divisor, int) or divisor < 1:
        raise ValueError(f"gradient_divisor must be a positive integer, got {gradient_divisor!r}")
    return divisor / world_size

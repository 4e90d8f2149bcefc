"""Joining a ``torchrun`` launch for inference: the default process group from the environment.

Training gets its process group from Lightning (`t3.launch`). Generation (``eval.py stage=generate`` and
`t3.generate` under ``torchrun``) has no engine to make one, so `distributed_from_env` does: with
``WORLD_SIZE > 1`` it initialises ``torch.distributed`` from torchrun's variables (``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), NCCL on a CUDA device (this process's ``LOCAL_RANK``-th
GPU becomes the current one) and gloo on the CPU, and destroys it again on exit. A process group that is
already initialised (the caller's own) is used as it is and left alone.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

__all__ = ["distributed_from_env", "env_world_size"]

logger = logging.getLogger(__name__)

# Collectives wait while rank 0 of an SP group decodes and writes a 4K video (minutes with the VAE)
# and while a slower SP group finishes its last video; NCCL's default of 10 minutes is too short for that.
_TIMEOUT = datetime.timedelta(hours=1)


def env_world_size() -> int:
    """The processes of this launch: the initialised default group's, else ``$WORLD_SIZE`` (1 alone)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        world = int(value)
    except ValueError:
        raise ValueError(f"WORLD_SIZE={value!r}: must be a positive integer (torchrun sets it)") from None
    if world < 1:
        raise ValueError(f"WORLD_SIZE={value!r}: must be a positive integer (torchrun sets it)")
    return world


@contextmanager
def distributed_from_env(device: torch.device) -> Iterator[bool]:
    """Initialise the default process group of a ``torchrun`` launch for the block; yields whether one is
    in effect (False for a single process without one).

    On CUDA the process's ``LOCAL_RANK`` selects its GPU first (``torch.device("cuda")`` then means it).
    """
    if dist.is_available() and dist.is_initialized():
        yield True
        return
    if env_world_size() == 1:
        yield False
        return
    backend = "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    dist.init_process_group(backend, timeout=_TIMEOUT)
    logger.info("rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    try:
        yield True
    finally:
        dist.destroy_process_group()

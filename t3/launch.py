"""Process launch glue: who starts the training ranks, and how Lightning learns about them.

Three ways start a training run, and in each exactly one party creates the processes:

- ``python train.py ...`` on one machine: Lightning itself starts one process per device (its
  subprocess launcher), unless ``LOCAL_RANK`` is already set (``torchrun``).
- ``srun python train.py ...`` in an sbatch script (``slurm/train.sbatch``): SLURM starts one task per
  GPU and Lightning's ``SLURMEnvironment`` reads the ranks from ``SLURM_PROCID``/``SLURM_LOCALID``; on
  ``SIGUSR1`` it saves ``hpc_ckpt_<n>.ckpt`` into the run folder and requeues the job.
- ``python train.py -m ... hydra/launcher=slurm`` (or ``local``): submitit starts
  ``tasks_per_node`` tasks per node and runs the Hydra job in each; the launcher's own requeue (SIGUSR2,
  ``max_num_timeout``) reruns the job, which resumes from its newest intact checkpoint.

In the submitit case Lightning must not spawn ranks of its own: `prepare_distributed_environment`
exports ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` (and ``NODE_RANK``,
``LOCAL_WORLD_SIZE``) from submitit's job environment, so that any cluster environment Lightning
picks sees the processes as created externally; `cluster_plugins` gives the Trainer the environment
that matches the launcher, with Lightning's requeue switched off where submitit requeues.

Usage, first thing in ``t3.training.train`` (before anything touches ``torch.distributed``)::

    prepare_distributed_environment()
    ...
    trainer = L.Trainer(..., plugins=cluster_plugins(num_processes=facts.world_size))
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DistributedEnvironment",
    "LaunchError",
    "cluster_plugins",
    "prepare_distributed_environment",
    "submitit_executor",
]

logger = logging.getLogger(__name__)

#: Variables `prepare_distributed_environment` exports (the ``env://`` rendezvous of torch.distributed,
#: plus the node rank that Lightning's default environment reads).
EXPORTED_VARIABLES = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "NODE_RANK",
)


class LaunchError(RuntimeError):
    """The processes of a run cannot be started the way the config and the launcher ask."""


@dataclass(frozen=True)
class DistributedEnvironment:
    """The ranks of this process, as exported into the environment.

    Attributes:
        executor: submitit executor that started the task (``slurm`` or ``local``).
        rank: Global rank (``RANK``).
        local_rank: Rank on this node (``LOCAL_RANK``).
        node_rank: Index of this node (``NODE_RANK``).
        world_size: Processes in the job (``WORLD_SIZE``).
        local_world_size: Processes on this node (``LOCAL_WORLD_SIZE``).
        master_addr: Host of rank 0 (``MASTER_ADDR``).
        master_port: Rendezvous port (``MASTER_PORT``), the same in every task of a job.
    """

    executor: str
    rank: int
    local_rank: int
    node_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int


def submitit_executor() -> str | None:
    """Name of the submitit executor that started this process (``slurm``, ``local``), or None.

    submitit sets ``SUBMITIT_EXECUTOR`` in every task it starts (the sbatch script exports it; the local
    executor passes it to its tasks); nothing else does.
    """
    return os.environ.get("SUBMITIT_EXECUTOR") or None


def prepare_distributed_environment() -> DistributedEnvironment | None:
    """Inside a submitit task, export its ranks so that Lightning does not start processes itself.

    A no-op (returns None) outside submitit. Inside, every task of the job gets the same
    ``MASTER_ADDR`` (first host of the job) and ``MASTER_PORT`` (derived from the job id unless already
    set), and its own ``RANK``/``LOCAL_RANK``. ``CUDA_VISIBLE_DEVICES`` is left alone: every task sees
    all GPUs of its node and Lightning picks ``cuda:LOCAL_RANK``, which ``trainer.devices`` (the GPU
    count) requires. Values already in the environment are overwritten: submitit's are authoritative
    for this task. Idempotent.

    Returns:
        The exported ranks, or None outside submitit.

    Raises:
        LaunchError: ``SUBMITIT_EXECUTOR`` is set but submitit cannot read the job environment.
    """
    executor = submitit_executor()
    if executor is None:
        return None
    import submitit
    from submitit.helpers import TorchDistributedEnvironment

    try:
        dist_env = TorchDistributedEnvironment()
        node_rank = submitit.JobEnvironment().node  # submitit's own export leaves the node rank out
    except (RuntimeError, KeyError, ValueError) as err:
        raise LaunchError(
            f"SUBMITIT_EXECUTOR={executor!r} is set, but submitit cannot read this task's job environment "
            f"({type(err).__name__}: {err}); unset SUBMITIT_EXECUTOR outside submitit jobs"
        ) from None
    # set_cuda_visible_devices=False: one GPU per task would break trainer.devices=<GPUs per node>.
    dist_env.export(set_cuda_visible_devices=False, overwrite=True)
    os.environ["NODE_RANK"] = str(node_rank)
    env = DistributedEnvironment(
        executor=executor,
        rank=dist_env.rank,
        local_rank=dist_env.local_rank,
        node_rank=node_rank,
        world_size=dist_env.world_size,
        local_world_size=dist_env.local_world_size,
        master_addr=dist_env.master_addr,
        master_port=dist_env.master_port,
    )
    _set_rank_zero_only(env.rank)
    logger.debug("submitit %s task: exported %s", executor, env)
    if env.rank == 0:
        logger.info(
            "submitit %s job: %d processes on %d node(s), rendezvous %s:%d",
            executor,
            env.world_size,
            env.world_size // max(env.local_world_size, 1),
            env.master_addr,
            env.master_port,
        )
    return env


def _set_rank_zero_only(rank: int) -> None:
    """Make Lightning's rank-zero filters right from now on, not only once the Trainer has started.

    Lightning reads the rank from the environment when it is imported, which in a submitit task happens
    before this module exports it; the Trainer sets it again at setup, to the same value.
    """
    try:
        from lightning.fabric.utilities.rank_zero import rank_zero_only
    except ImportError:  # Lightning is not needed to export the variables
        return
    rank_zero_only.rank = rank  # type: ignore[attr-defined]


def _hydra_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
    except ImportError:
        return False
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _srun_started() -> bool:
    """True in a task started by ``srun`` (what Lightning's ``SLURMEnvironment.detect`` tests)."""
    return "SLURM_NTASKS" in os.environ and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive")


def cluster_plugins(num_processes: int) -> list[Any]:
    """The Lightning cluster environment for the way this process was started, as Trainer ``plugins``.

    - submitit on SLURM: ``SLURMEnvironment(auto_requeue=False)``: ranks from SLURM; submitit requeues
      (SIGUSR2), so Lightning must not requeue as well.
    - submitit locally: ``LightningEnvironment()``, which sees the exported ``LOCAL_RANK`` and so treats
      the processes as created externally.
    - ``srun`` without submitit (``slurm/*.sbatch``): ``SLURMEnvironment(requeue_signal=SIGUSR1)``:
      on ``--signal=SIGUSR1@<s>`` it saves ``hpc_ckpt_<n>.ckpt`` and runs ``scontrol requeue``.
    - otherwise: none (``[]``); Lightning chooses, and starts one process per device itself.

    Args:
        num_processes: Processes the config asks for (``trainer.devices x trainer.num_nodes``).

    Returns:
        ``[]`` or a list with one ``ClusterEnvironment``.

    Raises:
        LaunchError: Inside submitit, when the tasks it started are not ``num_processes`` (call
            `prepare_distributed_environment` first). Or a Hydra multirun job (basic launcher) that would
            need Lightning to start more processes: Lightning restarts the script with the sweep's arguments, so every rank would run the
            whole sweep. Multi-device sweeps go through ``hydra/launcher=local`` or ``slurm``.
    """
    from lightning.fabric.plugins.environments import LightningEnvironment, SLURMEnvironment

    executor = submitit_executor()
    if executor is not None:
        started = int(os.environ.get("WORLD_SIZE", "1"))
        if started != num_processes:
            # Lightning would wait forever for ranks that were never started (or ignore extra ones).
            raise LaunchError(
                f"submitit started {started} task(s) for this job, but the config asks for {num_processes} "
                "processes (trainer.devices x trainer.num_nodes); make hydra.launcher.tasks_per_node x "
                "hydra.launcher.nodes equal to it"
            )
        if executor == "slurm":
            return [SLURMEnvironment(auto_requeue=False)]
        return [LightningEnvironment()]
    if _srun_started():
        return [SLURMEnvironment(auto_requeue=True, requeue_signal=signal.SIGUSR1)]
    externally_started = "LOCAL_RANK" in os.environ  # torchrun and the like
    if num_processes > 1 and not externally_started and _hydra_multirun():
        raise LaunchError(
            f"this sweep job needs {num_processes} processes, but with Hydra's basic launcher Lightning would "
            "start them by rerunning the whole sweep; use hydra/launcher=local (one task per device: "
            "hydra.launcher.tasks_per_node=<devices>) or hydra/launcher=slurm"
        )
    return []

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

`render_sweep_scripts` (``python -m t3.launch render <train.py overrides>``) prints the sbatch script
that ``python train.py -m <overrides> hydra/launcher=slurm`` would submit, without a cluster and
without submitting or writing anything: the way to check a sweep's resources before queueing it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DistributedEnvironment",
    "LaunchError",
    "cluster_plugins",
    "main",
    "prepare_distributed_environment",
    "render_sweep_scripts",
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


# --- render-only: the submission script of a sweep ---------------------------------------------------------

#: The training configs, beside this package in the repository.
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def _sweep_batches(cfg: Any, sweep_overrides: Sequence[str]) -> list[list[list[str]]]:
    """The jobs of the sweep, batched as Hydra's basic sweeper would: the study's ``hydra.sweeper.params``
    with the command line's sweep overrides (which win for the same key)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = cfg.hydra.sweeper.get("params") or {}
    arguments = [f"{key}={value}" for key, value in params.items()] + list(sweep_overrides)
    parsed = OverridesParser.create().parse_overrides(arguments)
    batches = BasicSweeper.split_arguments(parsed, cfg.hydra.sweeper.get("max_batch_size"))
    return [[list(job) for job in batch] for batch in batches]


def _sbatch_text(launcher_params: dict[str, Any], num_jobs: int) -> str:
    """What hydra-submitit-launcher's SLURM launcher submits for ``num_jobs`` jobs (one array job for
    more than one), built with submitit's own executor: the same parameter translation and template."""
    import submitit
    from submitit.slurm.slurm import SlurmExecutor

    class RenderingExecutor(SlurmExecutor):
        @classmethod
        def affinity(cls) -> int:
            return 1  # renders only: needs no srun on this machine

    params = {k: v for k, v in launcher_params.items() if v is not None}
    executor = RenderingExecutor(params.pop("submitit_folder"), max_num_timeout=params.pop("max_num_timeout"))
    generic = submitit.AutoExecutor._typed_parameters()
    converted = executor._convert_parameters({k: v for k, v in params.items() if k in generic})
    converted.update({k: v for k, v in params.items() if k not in generic})
    executor.update_parameters(**converted)
    if num_jobs > 1:
        executor.parameters["map_count"] = num_jobs
    return executor._make_submission_file_text(executor._submitit_command_str, "render")


def render_sweep_scripts(overrides: Sequence[str]) -> list[tuple[list[list[str]], str]]:
    """The sbatch scripts ``python train.py -m <overrides>`` would submit with ``hydra/launcher=slurm``.

    Nothing is submitted and nothing is written; no cluster is needed. ``hydra/launcher=slurm`` is
    added unless the overrides choose a launcher.

    Returns:
        One ``(jobs, script)`` per batch of the sweeper (normally one array job for the whole sweep),
        ``jobs`` being each job's overrides.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.utils import instantiate

    from t3.config import register_configs

    overrides = list(overrides)
    if not any(o.startswith("hydra/launcher=") for o in overrides):
        overrides.append("hydra/launcher=slurm")
    if not any(o.startswith("hydra.job.name=") for o in overrides):
        overrides.append("hydra.job.name=train")  # what `python train.py` names its jobs (the SLURM job name)
    parsed = OverridesParser.create().parse_overrides(overrides)
    sweep = [o.input_line for o in parsed if o.is_sweep_override()]
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=fixed, return_hydra_config=True)
    GlobalHydra.instance().clear()
    launcher = instantiate(cfg.hydra.launcher)
    if not hasattr(launcher, "params"):
        raise LaunchError(f"hydra/launcher: {type(launcher).__name__} is not a submitit launcher; use slurm")
    return [(jobs, _sbatch_text(launcher.params, len(jobs))) for jobs in _sweep_batches(cfg, sweep)]


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m t3.launch render <train.py overrides>``: print a sweep's sbatch script(s)."""
    parser = argparse.ArgumentParser(
        prog="python -m t3.launch",
        description="Print the sbatch script that `python train.py -m <overrides> hydra/launcher=slurm` would "
        "submit, without a cluster (nothing is submitted or written). The job list goes to stderr.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    render = commands.add_parser("render", help="print the submission script of a sweep")
    render.add_argument("overrides", nargs="*", help="train.py overrides, e.g. experiment=ablation_branches")
    args = parser.parse_args(argv)
    try:
        batches = render_sweep_scripts(args.overrides)
    except Exception as err:  # noqa: BLE001 - a CLI: one line, not a traceback
        raise SystemExit(f"error: {type(err).__name__}: {str(err).splitlines()[0]}") from None
    for number, (jobs, script) in enumerate(batches, start=1):
        for index, job in enumerate(jobs):
            print(f"# job {index}: {' '.join(job) or '(no overrides)'}", file=sys.stderr)  # noqa: T201
        if len(batches) > 1:
            print(f"# --- array job {number} of {len(batches)} ---")  # noqa: T201
        print(script)  # noqa: T201 - the CLI's output


if __name__ == "__main__":
    main()

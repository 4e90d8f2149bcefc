"""SLURM without a cluster: the sbatch script the sweep launcher renders, the sbatch templates in slurm/, and
the distributed environment a submitit task exports so that Lightning starts no processes of its own."""

from __future__ import annotations

import functools
import os
import re
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from hydra.utils import instantiate

from t3.launch import EXPORTED_VARIABLES, LaunchError, cluster_plugins, prepare_distributed_environment

from .conftest import REPO_ROOT
from .test_sweeps import compose_with_hydra, sweep_jobs

SLURM_DIR = REPO_ROOT / "slurm"
TEMPLATES = sorted(SLURM_DIR.glob("*.sbatch"))
TRAIN_TEMPLATES = [SLURM_DIR / "train.sbatch", SLURM_DIR / "train_multinode.sbatch"]

# Task 11 of a 2-node x 8-GPU job started by submitit's sbatch script (srun sets the SLURM_* variables).
SLURM_TASK = {
    "SUBMITIT_EXECUTOR": "slurm",
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NAME": "train",
    "SLURM_NTASKS": "16",
    "SLURM_NTASKS_PER_NODE": "8",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_NNODES": "2",
    "SLURM_NODEID": "1",
    "SLURM_PROCID": "11",
    "SLURM_LOCALID": "3",
    "SLURM_JOB_NODELIST": "gpu-[017-018]",
}
# Task 1 of a 2-process job of submitit's local executor.
LOCAL_TASK = {
    "SUBMITIT_EXECUTOR": "local",
    "SUBMITIT_LOCAL_JOB_ID": "777",
    "SUBMITIT_LOCAL_NTASKS": "2",
    "SUBMITIT_LOCAL_JOB_NUM_NODES": "1",
    "SUBMITIT_LOCAL_NODEID": "0",
    "SUBMITIT_LOCAL_GLOBALID": "1",
    "SUBMITIT_LOCAL_LOCALID": "1",
}


@pytest.fixture
def clean_env():
    """No launcher variables to start with; ``os.environ`` and Lightning's rank restored afterwards
    (the code under test writes both directly)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    saved, saved_rank = dict(os.environ), rank_zero_only.rank
    for key in list(os.environ):
        if key.startswith(("SLURM_", "SUBMITIT_")) or key in EXPORTED_VARIABLES:
            del os.environ[key]
    yield os.environ
    os.environ.clear()
    os.environ.update(saved)
    rank_zero_only.rank = saved_rank


# --- prepare_distributed_environment -----------------------------------------------------------------------


def test_prepare_is_a_noop_outside_submitit(clean_env):
    before = dict(clean_env)
    assert prepare_distributed_environment() is None
    assert dict(clean_env) == before


def test_prepare_exports_the_ranks_of_a_slurm_task(clean_env):
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    clean_env.update(SLURM_TASK, CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7")
    env = prepare_distributed_environment()
    assert env is not None and env.executor == "slurm"
    exported = {k: clean_env[k] for k in EXPORTED_VARIABLES}
    port = exported.pop("MASTER_PORT")
    assert exported == {
        "MASTER_ADDR": "gpu-017",  # first host of the allocation
        "RANK": "11",
        "WORLD_SIZE": "16",
        "LOCAL_RANK": "3",
        "LOCAL_WORLD_SIZE": "8",
        "NODE_RANK": "1",
    }
    assert 20000 <= int(port) <= 60000 and env.master_port == int(port)
    assert clean_env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7"  # every task sees its node's GPUs
    assert rank_zero_only.rank == 11

    # Rank 0 of the same job, on the other node, agrees on the rendezvous.
    clean_env.update(SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0")
    del clean_env["MASTER_PORT"]
    rank0 = prepare_distributed_environment()
    assert (rank0.rank, rank0.node_rank, rank0.master_addr) == (0, 0, "gpu-017")
    assert rank0.master_port == env.master_port


def test_prepare_keeps_a_given_master_port_and_is_idempotent(clean_env):
    clean_env.update(SLURM_TASK, MASTER_PORT="29512")
    first = prepare_distributed_environment()
    assert first == prepare_distributed_environment()
    assert first.master_port == 29512 and clean_env["MASTER_PORT"] == "29512"


def test_prepare_exports_the_ranks_of_a_local_task(clean_env):
    clean_env.update(LOCAL_TASK)
    env = prepare_distributed_environment()
    assert (env.executor, env.rank, env.local_rank, env.world_size, env.node_rank) == ("local", 1, 1, 2, 0)
    assert clean_env["MASTER_ADDR"] == socket.gethostname() and clean_env["LOCAL_RANK"] == "1"


def test_prepare_names_the_problem_when_the_job_environment_is_incomplete(clean_env):
    clean_env["SUBMITIT_EXECUTOR"] = "slurm"  # but no SLURM_* variables
    with pytest.raises(LaunchError, match="SUBMITIT_EXECUTOR='slurm'.*cannot read"):
        prepare_distributed_environment()


# --- cluster_plugins -----------------------------------------------------------------------------------------


def test_submitit_slurm_tasks_get_slurm_ranks_and_no_lightning_requeue(clean_env):
    from lightning.fabric.plugins.environments import SLURMEnvironment

    clean_env.update(SLURM_TASK)
    prepare_distributed_environment()
    (env,) = cluster_plugins(num_processes=16)
    assert isinstance(env, SLURMEnvironment) and env.creates_processes_externally
    assert not env.auto_requeue  # submitit requeues; two requeues of one job would race
    assert (env.global_rank(), env.local_rank(), env.world_size()) == (11, 3, 16)
    with pytest.raises(LaunchError, match="started 16 task.*asks for 8"):
        cluster_plugins(num_processes=8)


def test_submitit_local_tasks_count_as_started_externally(clean_env):
    from lightning.fabric.plugins.environments import LightningEnvironment

    clean_env.update(LOCAL_TASK)
    prepare_distributed_environment()
    (env,) = cluster_plugins(num_processes=2)
    assert isinstance(env, LightningEnvironment) and env.creates_processes_externally
    with pytest.raises(LaunchError, match="tasks_per_node"):
        cluster_plugins(num_processes=4)


def test_srun_without_submitit_requeues_on_sigusr1(clean_env):
    from lightning.fabric.plugins.environments import SLURMEnvironment

    clean_env.update({k: v for k, v in SLURM_TASK.items() if k != "SUBMITIT_EXECUTOR"})
    assert prepare_distributed_environment() is None  # srun already set the ranks
    (env,) = cluster_plugins(num_processes=16)
    assert isinstance(env, SLURMEnvironment) and env.auto_requeue and env.requeue_signal == signal.SIGUSR1


def test_plain_runs_leave_the_choice_to_lightning_except_in_a_multirun(clean_env):
    from hydra.core.hydra_config import HydraConfig

    assert cluster_plugins(num_processes=1) == [] and cluster_plugins(num_processes=2) == []
    cfg = compose_with_hydra("hydra.mode=MULTIRUN")
    HydraConfig.instance().set_config(cfg)
    try:
        assert cluster_plugins(num_processes=1) == []
        with pytest.raises(LaunchError, match="hydra/launcher=local"):
            cluster_plugins(num_processes=2)
    finally:
        HydraConfig.instance().cfg = None


# --- the sweep launcher's sbatch script ----------------------------------------------------------------------


class _Submitted(Exception):
    """Raised in place of calling sbatch, once the script is written."""


def _no_task(cfg) -> None:
    """Stands in for train.py's task function (never called)."""


def render_sweep_script(tmp_path: Path, monkeypatch, *overrides: str, sweep: Sequence[str] = ()) -> str:
    """The sbatch script ``python train.py -m <overrides> <sweep> hydra/launcher=slurm`` would submit.

    Runs hydra-submitit-launcher's own ``launch`` (parameters -> submitit executor -> array submission)
    up to the point where submitit would call ``sbatch``.
    """
    from submitit.slurm.slurm import SlurmExecutor

    cfg = compose_with_hydra("hydra/launcher=slurm", *overrides, root=tmp_path)
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=_no_task, config=cfg)
    script = {}

    def capture(self, command):
        script["text"] = self._make_submission_file_text(command, "test")
        raise _Submitted

    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # "srun is available"
    monkeypatch.setattr(SlurmExecutor, "_submit_command", capture)
    with pytest.raises(_Submitted):
        launcher.launch(sweep_jobs(cfg, *sweep), initial_job_idx=0)
    return script["text"]


def sbatch_flags(script: str) -> dict[str, str]:
    flags = {}
    for line in script.splitlines():
        if match := re.fullmatch(r"#SBATCH --([\w-]+)(?:=(.*))?", line.strip()):
            flags[match[1]] = match[2] if match[2] is not None else "true"
    return flags


def test_slurm_launcher_renders_the_requested_resources(tmp_path, monkeypatch):
    monkeypatch.setenv("T3_SLURM_PARTITION", "test-partition")
    monkeypatch.setenv("T3_SLURM_ACCOUNT", "test-account")
    monkeypatch.setenv("T3_SLURM_ARRAY_PARALLELISM", "2")
    script = render_sweep_script(tmp_path, monkeypatch, "experiment=ablation_branches", "trainer.num_nodes=2")
    flags = sbatch_flags(script)
    assert flags["nodes"] == "2"
    assert flags["gpus-per-node"] == "8" and flags["ntasks-per-node"] == "8"  # one task per GPU
    assert flags["array"] == "0-3%2"  # the study's 4 runs, 2 at a time
    assert flags["signal"] == "USR2@120"  # submitit's requeue signal (its handler requeues the task)
    assert flags["requeue"] == "true"
    assert flags["partition"] == "test-partition" and flags["account"] == "test-account"
    assert flags["time"] == "1440" and flags["cpus-per-task"] == "8"
    assert "export SUBMITIT_EXECUTOR=slurm" in script
    assert re.search(r"^srun .*-m submitit\.core\._submit", script, re.M)


def test_slurm_launcher_leaves_unset_cluster_settings_to_the_cluster(tmp_path, monkeypatch):
    for var in ("PARTITION", "ACCOUNT", "QOS", "CONSTRAINT", "MEM_GB"):
        monkeypatch.delenv(f"T3_SLURM_{var}", raising=False)
    monkeypatch.setenv("T3_SLURM_GPUS_PER_NODE", "4")
    script = render_sweep_script(tmp_path, monkeypatch, "experiment=ablation_demo")
    flags = sbatch_flags(script)
    assert not {"partition", "account", "qos", "constraint", "mem"} & set(flags)
    assert (flags["nodes"], flags["gpus-per-node"], flags["ntasks-per-node"]) == ("1", "4", "4")
    assert flags["array"] == "0-3%4"


def test_launcher_configs_read_only_documented_variables():
    """Every variable the launcher configs read is in slurm/env.example; no cluster value is committed."""
    env_example = (SLURM_DIR / "env.example").read_text()
    for name in ("slurm", "local"):
        text = (REPO_ROOT / "conf" / "hydra" / "launcher" / f"{name}.yaml").read_text()
        for var in re.findall(r"oc\.env:(\w+)", text):
            assert f"export {var}=" in env_example, f"{var} of {name}.yaml is not in slurm/env.example"
        for key in ("partition", "account", "qos"):
            for value in re.findall(rf"^{key}:\s*(.*)$", text, re.M):
                assert value.startswith("${oc.env:") and value.endswith(",null}"), (name, key, value)


# --- the sbatch templates ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.name)
def test_sbatch_templates_are_valid_bash_without_cluster_specifics(path):
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text()
    directives = re.findall(r"^#SBATCH (.*)$", text, re.M)
    assert directives and not [d for d in directives if re.match(r"--(partition|account|qos)\b|-[pAq]\b", d)]
    assert not re.search(r"/(home|scratch|gpfs|lustre|users?)/\w", text), "no user or cluster paths"


@pytest.mark.parametrize("path", TRAIN_TEMPLATES, ids=lambda p: p.name)
def test_train_templates_request_one_task_per_gpu_and_requeue(path):
    flags = sbatch_flags(path.read_text())
    assert flags["ntasks-per-node"] == flags["gpus-per-node"]
    assert flags["signal"] == "SIGUSR1@120" and flags["requeue"] == "true"
    assert int(flags["nodes"]) == (2 if "multinode" in path.name else 1)
    subprocess.run(["bash", "-n", str(SLURM_DIR / "env.example")], check=True)


def fake_srun(tmp_path: Path) -> Path:
    """A folder whose ``srun`` prints the command it was given instead of running it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text('#!/usr/bin/env bash\necho "srun $*"\n')
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def template_env(tmp_path: Path, **slurm: str) -> dict[str, str]:
    """The environment of a template run by a fake ``srun`` (`fake_srun`): ``tmp_path`` is the submit
    folder (the repository: ``slurm/job_env.sh``, no ``slurm/env.local``), plus the given SLURM variables."""
    (tmp_path / "slurm").mkdir()
    (tmp_path / "slurm" / "job_env.sh").write_text((SLURM_DIR / "job_env.sh").read_text())
    return {"PATH": f"{fake_srun(tmp_path)}:{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(tmp_path), **slurm}


@pytest.mark.parametrize("path", TRAIN_TEMPLATES, ids=lambda p: p.name)
def test_train_templates_pass_the_allocation_to_train_py(path, tmp_path):
    env = template_env(
        tmp_path,
        SLURM_JOB_ID="1",
        SLURM_NNODES="2",
        SLURM_JOB_NODELIST="gpu-[1-2]",
        SLURM_NTASKS_PER_NODE="4",
        SLURM_GPUS_PER_NODE="h100:4",
    )
    out = subprocess.run(
        ["bash", str(path), "experiment=t3_4k", "seed=1"], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert "srun python train.py trainer.devices=4 trainer.num_nodes=2 experiment=t3_4k seed=1" in out

    env["SLURM_GPUS_PER_NODE"] = "8"
    bad = subprocess.run(["bash", str(path), "experiment=t3_4k"], env=env, capture_output=True, text=True)
    assert bad.returncode == 1 and "--ntasks-per-node=4 but --gpus-per-node=8" in bad.stderr


@pytest.mark.parametrize(
    "gpus,launcher", [(None, "python"), ("1", "python"), ("8", "torchrun --standalone --nproc_per_node 8")]
)
def test_eval_array_runs_torchrun_when_a_task_has_several_gpus(gpus, launcher, tmp_path):
    env = template_env(
        tmp_path,
        SLURM_ARRAY_TASK_ID="3",
        SLURM_ARRAY_TASK_COUNT="8",
        SLURM_ARRAY_JOB_ID="7",
        **({"SLURM_GPUS_ON_NODE": gpus} if gpus else {}),
    )
    args = ["benchmark=4k_vbench", "parallel.sequence_parallel_size=8"]
    out = subprocess.run(
        ["bash", str(SLURM_DIR / "eval_array.sbatch"), *args],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"srun {launcher} eval.py shard_index=3 num_shards=8 {' '.join(args)}" in out


def test_multinode_template_runs_4k_with_sp8_and_data_parallel_2(tmp_path):
    """The 2-node x 8-GPU sequence-parallel run of slurm/README.md: the command srun starts composes into a
    valid run of world 16 = 2 SP groups of 8, global batch 64 = micro 1 x data-parallel 2 x accumulate 32."""
    from t3.config import validate

    from .test_configs import compose_train

    env = template_env(
        tmp_path,
        SLURM_JOB_ID="1",
        SLURM_NNODES="2",
        SLURM_JOB_NODELIST="gpu-[1-2]",
        SLURM_NTASKS_PER_NODE="8",
        SLURM_GPUS_PER_NODE="8",
    )
    args = ["experiment=t3_4k_sp8", "data.train.urls_or_dir=/data/shards/4k"]
    out = subprocess.run(
        ["bash", str(SLURM_DIR / "train_multinode.sbatch"), *args],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    command = next(line for line in out.splitlines() if line.startswith("srun "))
    overrides = command.split("python train.py ", 1)[1].split()
    assert overrides == ["trainer.devices=8", "trainer.num_nodes=2", *args]
    assert f"sbatch slurm/train_multinode.sbatch {' '.join(args)}" in (SLURM_DIR / "README.md").read_text()

    # As the dry run plans it: the world size from trainer.devices x trainer.num_nodes.
    cfg = compose_train(*overrides, "dry_run=true")
    facts = validate(cfg)
    assert cfg.parallel.sequence_parallel_size == 8 and not cfg.finetune.offload_activations
    assert (facts.world_size, facts.sequence_parallel_size, facts.data_parallel_size) == (16, 8, 2)
    assert cfg.batch.global_size == cfg.batch.micro_size * facts.data_parallel_size * facts.accumulate == 64
    assert facts.accumulate == 32


# --- end to end: submitit starts the ranks, Lightning only joins them ----------------------------------------


def _ddp_task() -> dict:
    """One submitit task: a 2-process CPU DDP fit of a linear model, ranks from submitit."""
    import lightning as L
    import torch

    env = prepare_distributed_environment()

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4)), batch_size=2)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        plugins=cluster_plugins(num_processes=2),
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Tiny(), data)
    return {
        "rank": env.rank if env else None,
        "global_rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "num_spawned": len(getattr(trainer.strategy.launcher, "procs", [])),
        "external": trainer.strategy.cluster_environment.creates_processes_externally,
        "weight": trainer.lightning_module.layer.weight.detach().flatten().tolist(),
    }


@pytest.mark.slow
def test_submitit_tasks_form_one_ddp_job_without_lightning_spawning(tmp_path, monkeypatch):
    import submitit

    monkeypatch.setenv("PYTHONPATH", f"{REPO_ROOT}:{os.environ.get('PYTHONPATH', '')}")
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="local")
    executor.update_parameters(tasks_per_node=2, timeout_min=5)
    results = executor.submit(_ddp_task).results()
    assert sorted((r["rank"], r["global_rank"], r["world_size"]) for r in results) == [(0, 0, 2), (1, 1, 2)]
    assert [(r["external"], r["num_spawned"]) for r in results] == [(True, 0)] * 2  # Lightning started none
    assert results[0]["weight"] == results[1]["weight"]  # one model, trained together


# --- CPUs per task, env.local, containers, render-only ------------------------------------------------------


def test_slurm_launcher_hands_the_cpus_per_task_to_srun(tmp_path, monkeypatch):
    """Since Slurm 22.05 srun does not inherit --cpus-per-task: the sweep's tasks get it through the job env."""
    monkeypatch.setenv("T3_SLURM_CPUS_PER_TASK", "12")
    flags = sbatch_flags(render_sweep_script(tmp_path, monkeypatch, "experiment=ablation_demo"))
    assert flags["cpus-per-task"] == "12" and flags["export"] == "ALL,SRUN_CPUS_PER_TASK=12"


def fake_srun_printing_env(tmp_path: Path) -> Path:
    bin_dir = fake_srun(tmp_path)
    (bin_dir / "srun").write_text(
        '#!/usr/bin/env bash\necho "srun cpus=${SRUN_CPUS_PER_TASK:-unset} mark=${T3_TEST_MARK:-unset} $*"\n'
    )
    return bin_dir


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.name)
def test_templates_source_env_local_and_pass_cpus_and_container_to_srun(path, tmp_path):
    submit_dir = tmp_path / "repo"
    (submit_dir / "slurm").mkdir(parents=True)
    (submit_dir / "slurm" / "job_env.sh").write_text((SLURM_DIR / "job_env.sh").read_text())
    (submit_dir / "slurm" / "env.local").write_text("export T3_TEST_MARK=from-env-local\n")
    env = {
        "PATH": f"{fake_srun_printing_env(tmp_path)}:{os.environ['PATH']}",
        "SLURM_SUBMIT_DIR": str(submit_dir),
        "SLURM_JOB_ID": "1",
        "SLURM_NNODES": "1",
        "SLURM_JOB_NODELIST": "gpu-1",
        "SLURM_NTASKS_PER_NODE": "4",
        "SLURM_GPUS_PER_NODE": "4",
        "SLURM_CPUS_PER_TASK": "6",
        "SLURM_ARRAY_TASK_ID": "2",
        "SLURM_ARRAY_TASK_COUNT": "8",
        "SLURM_ARRAY_JOB_ID": "1",
    }
    run = functools.partial(
        subprocess.run, ["bash", str(path), "seed=1"], capture_output=True, text=True, check=True
    )
    out = run(env=env).stdout
    entry = "eval.py" if "eval" in path.name else "train.py"
    assert f"srun cpus=6 mark=from-env-local python {entry} " in out
    out = run(env={**env, "T3_CONTAINER": "/images/t3.sif"}).stdout
    assert f"srun cpus=6 mark=from-env-local apptainer exec --nv /images/t3.sif python {entry} " in out


@pytest.mark.parametrize(
    "overrides",
    [
        ("experiment=ablation_branches", "trainer.num_nodes=2", "t3=dense,wan21_windows"),
        ("experiment=ablation_base",),
    ],
    ids=["array", "one job"],
)
def test_render_prints_exactly_what_the_sweep_launcher_submits(tmp_path, monkeypatch, overrides):
    from t3.launch import render_sweep_scripts

    monkeypatch.chdir(tmp_path)
    root = f"paths.root_dir={tmp_path}"
    ((jobs, script),) = render_sweep_scripts([root, *overrides])
    assert not (tmp_path / "outputs").exists()  # nothing written (the launcher below makes the sweep dir)
    sweep = [o for o in overrides if "," in o]
    expected = render_sweep_script(tmp_path, monkeypatch, root, *[o for o in overrides if o not in sweep],
                                   "hydra.job.name=train", sweep=sweep)  # fmt: skip
    assert script == expected
    assert len(jobs) == (2 if sweep else 1) and ("#SBATCH --array=0-1%" in script) == bool(sweep)


def test_render_cli_prints_the_script_without_a_cluster(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, "-m", "t3.launch", "render", "experiment=ablation_demo", f"paths.root_dir={tmp_path}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    flags = sbatch_flags(proc.stdout)
    assert flags["array"] == "0-3%4" and flags["job-name"] == "train"
    assert "# job 3: t3=wan21_windows finetune.trainable=attention" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_container_recipe_copies_files_of_the_repository():
    recipe = (SLURM_DIR / "t3.def").read_text()
    files = recipe.split("%files", 1)[1].split("%post", 1)[0]
    sources = [line.split()[0] for line in files.strip().splitlines()]
    assert sources and all((REPO_ROOT / source).exists() for source in sources), sources
    assert 'pip install --no-cache-dir "/opt/t3[all]"' in recipe  # the pinned dependencies of pyproject.toml

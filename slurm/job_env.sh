# The job-side environment shared by the sbatch templates; sourced from the repository root:
#
#   source slurm/job_env.sh
#   srun "${T3_LAUNCH[@]}" python train.py ...
#
# - slurm/env.local, when it exists: what the job itself needs (T3_VENV, T3_CONTAINER, NCCL settings...).
# - T3_VENV: a virtual environment to activate (it must be at the same path on every node).
# - SRUN_CPUS_PER_TASK: since Slurm 22.05, srun does not inherit sbatch's --cpus-per-task; without it
#   every rank may get a single CPU for itself and its data.num_workers loader processes.
# - T3_LAUNCH: the command prefix of every srun task: empty, or `apptainer exec --nv $T3_CONTAINER`
#   when T3_CONTAINER names an image (slurm/t3.def) for nodes that do not see the login node's Python.
#   Apptainer mounts the working directory (this repository) and $HOME; add data folders with
#   APPTAINER_BIND=/data,/models.

if [[ -f slurm/env.local ]]; then
    # shellcheck disable=SC1091
    source slurm/env.local
fi
if [[ -n "${T3_VENV:-}" ]]; then
    # shellcheck disable=SC1091
    source "${T3_VENV}/bin/activate"
fi
if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
    export SRUN_CPUS_PER_TASK="${SLURM_CPUS_PER_TASK}"
fi
T3_LAUNCH=()
if [[ -n "${T3_CONTAINER:-}" ]]; then
    T3_LAUNCH=(apptainer exec --nv "${T3_CONTAINER}")
fi

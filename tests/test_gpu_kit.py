"""The GPU validation kit (benchmarks/gpu/): its CPU mode, budgets, results files and wheel list."""

from __future__ import annotations

import subprocess
import sys

from .conftest import REPO_ROOT


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )


def test_training_path_imports_without_packages_absent_on_the_gpu_machine():
    # The kit's Lightning check runs train.py on a machine without deepspeed, webdataset, decord,
    # av, wandb, submitit, ftfy: the synthetic-data training path must not import them.
    result = _python(
        "from benchmarks.gpu.machine import block_absent_imports\n"
        "block_absent_imports()\n"
        "from hydra.utils import get_method\n"
        "get_method('t3.training.datamodule.synthetic_latents')\n"
        "import t3.training.train, t3.training.module, t3.training.callbacks, t3.training.strategies\n"
        "import t3.training.export, t3.training.plan, t3.launch\n"
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_dit_path_imports_without_packages_absent_on_the_gpu_machine():
    # The kit's DiT and memory checks cast a random DiT as generation does (t3.generate), on a machine
    # without PyAV: only writing or reading mp4 files may need it.
    result = _python(
        "from benchmarks.gpu.machine import block_absent_imports\n"
        "block_absent_imports()\n"
        "import t3.generate, t3.video_io, t3.eval.speed_stage\n"
    )
    assert result.returncode == 0, result.stderr[-2000:]

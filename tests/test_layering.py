"""The package's layers: the core imports with the base install alone, and training and eval stay apart.

The core (attention ops, models, diffusion, data readers, the T3 transform) imports with what
``pip install t3`` gives without extras (``pyproject.toml``): no Lightning, Hydra, DeepSpeed or wandb, and
the data extra's video and shard packages only where a reader runs. Training (``t3.training``) and
evaluation (``t3.eval``) are separate wings that share the core and never import each other.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO_ROOT

CORE = ["t3.attention", "t3.models", "t3.diffusion", "t3.data", "t3.transform"]
# Installed only by the extras of pyproject.toml (train, eval, data), never by the base install.
EXTRAS_ONLY = [
    "av",
    "decord",
    "deepspeed",
    "hydra",
    "lightning",
    "matplotlib",
    "omegaconf",
    "peft",
    "submitit",
    "torchmetrics",
    "wandb",
    "webdataset",
]


def test_core_imports_with_the_base_install_alone():
    code = (
        "import sys\n"
        f"import {', '.join(CORE)}\n"
        f"loaded = sorted({{m.split('.')[0] for m in sys.modules}} & {set(EXTRAS_ONLY)!r})\n"
        "print(','.join(loaded))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "", f"importing {CORE} loads {result.stdout.strip()}"


def _imported_modules(path: Path) -> set[str]:
    """Every module a source file imports, at top level or inside a function."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize(("package", "forbidden"), [("training", "t3.eval"), ("eval", "t3.training")])
def test_training_and_eval_never_import_each_other(package, forbidden):
    offenders = [
        f"{path.relative_to(REPO_ROOT)} imports {name}"
        for path in sorted((REPO_ROOT / "t3" / package).rglob("*.py"))
        for name in sorted(_imported_modules(path))
        if name == forbidden or name.startswith(forbidden + ".")
    ]
    assert not offenders, "; ".join(offenders)

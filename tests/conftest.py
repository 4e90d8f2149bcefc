"""Shared test set-up: offline, CPU-only, seeded."""

from __future__ import annotations

import os
from pathlib import Path

# Nothing in the test suite may reach the network or a GPU-only DeepSpeed accelerator.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
# The benchmark prompt lists the package ships (t3/eval/prompt_lists), read where the package keeps them.
PROMPT_LISTS = REPO_ROOT / "t3" / "eval" / "prompt_lists"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def requires_cuda(reason: str = "needs a CUDA device"):
    return pytest.mark.skipif(not torch.cuda.is_available(), reason=reason)

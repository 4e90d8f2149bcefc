"""What the lent GPU machine has and lacks, and how the kit makes up for it.

The machine (one H200, Python 3.12, torch 2.11) reaches no package registry. It has torch,
lightning, transformers, peft, einops, safetensors, torchmetrics, accelerate, sentencepiece,
tqdm, matplotlib, pytest and triton. What the kit needs beyond that travels as wheels
(`CARRIED`, downloaded by ``prepare_wheels.py`` into ``.whl/``); everything else in `ABSENT`
is missing there, so nothing on the kit's path may import it. In ``--cpu`` mode the kit blocks
these imports (`block_absent_imports`) so that the CPU test fails where the GPU run would.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

__all__ = ["ABSENT", "CARRIED", "TRANSITIVE_PINS", "block_absent_imports"]

#: Distributions carried as wheels; their exact versions are the pins in ``pyproject.toml``.
CARRIED: tuple[str, ...] = ("diffusers", "hydra-core")

#: Dependencies of `CARRIED` that are missing on the machine and not pinned in ``pyproject.toml``:
#: the versions installed beside the pinned ones here (hydra-core 1.3.8 needs omegaconf 2.2-2.3
#: and antlr4-python3-runtime 4.9.*; the latter is published as a source archive only, so it is
#: built into a wheel).
TRANSITIVE_PINS: dict[str, str] = {"omegaconf": "2.3.1", "antlr4-python3-runtime": "4.9.3"}

#: Top-level modules missing on the machine and not carried (project dependencies that only
#: optional paths use: DeepSpeed strategies, latent shards, video decoding, wandb, SLURM, prompt
#: clean-up, the flash backend).
ABSENT: tuple[str, ...] = (
    "deepspeed",
    "webdataset",
    "decord",
    "av",
    "wandb",
    "submitit",
    "ftfy",
    "flash_attn",
)


def block_absent_imports(names: Iterable[str] = ABSENT) -> None:
    """Make ``import name`` fail for every module in ``names``, as on the GPU machine.

    A ``None`` entry in ``sys.modules`` makes ``import`` raise ``ModuleNotFoundError`` and
    ``importlib.util.find_spec`` answer None, which is how libraries probe for optional packages
    (diffusers does at import). Call it before anything imports them.
    """
    for name in names:
        if sys.modules.get(name) is not None:
            raise RuntimeError(f"{name} is already imported; block it before anything imports it")
        sys.modules[name] = None  # type: ignore[assignment]

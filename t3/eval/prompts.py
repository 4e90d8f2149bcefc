"""Benchmark prompt lists and how they are split over the tasks of an array job.

A prompt list is the T3-Video authors' format: a JSON list of ``{"data_file": "vids/<id>.mp4",
"prompt_en": "..."}``. ``data_file`` names the reference video of the prompt relative to a data root
(4K-VBench); it is empty where there is none (4K-World-Vision). A prompt keeps its position in the list
as its index: output files are named from it, so every task of a sharded run agrees on them.

The two lists of the paper (4K-VBench, 4K-World-Vision; the T3-Video authors', Apache-2.0) ship with the
package in ``prompt_lists/``; ``conf/benchmark/*.yaml`` name them as ``${t3.prompt_list:<file>}``, which
`prompt_list_path` resolves from any working directory (or in ``$T3_PROMPTS_DIR`` when that is set).

Sharding splits the indices into contiguous, balanced ranges (sizes differ by at most one; the first
``n % num_shards`` shards get the extra prompt), so shard ``i`` of ``N`` always gets the same prompts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "PROMPT_LISTS_DIR",
    "PromptEntry",
    "check_shard",
    "describe_shards",
    "load_prompts",
    "prompt_list_path",
    "register_resolvers",
    "resolve_shard",
    "shard_range",
]

#: The prompt lists shipped with the package (see ``prompt_lists/README.md`` for their origin).
PROMPT_LISTS_DIR = Path(__file__).resolve().parent / "prompt_lists"
#: Environment variable naming a folder of the user's own prompt lists, used instead of the shipped ones.
PROMPTS_DIR_ENV = "T3_PROMPTS_DIR"


def prompt_list_path(name: str) -> str:
    """The prompt list file ``name``: in ``$T3_PROMPTS_DIR`` when set, else the copy shipped in the package."""
    folder = os.environ.get(PROMPTS_DIR_ENV) or PROMPT_LISTS_DIR
    return str(Path(folder) / name)


def register_resolvers() -> None:
    """Register ``${t3.prompt_list:<file>}`` with OmegaConf (idempotent), for ``conf/benchmark/*.yaml``."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("t3.prompt_list", prompt_list_path, replace=True)


@dataclass(frozen=True)
class PromptEntry:
    """One prompt of a benchmark.

    Attributes:
        index: Position in the prompt list (0-based); names the output files.
        prompt: The English prompt (``prompt_en``).
        data_file: The reference video relative to the benchmark's data root, or ``""`` if none.
    """

    index: int
    prompt: str
    data_file: str = ""


def load_prompts(path: str | os.PathLike, *, limit: int | None = None) -> list[PromptEntry]:
    """Read a prompt list in the authors' format.

    Args:
        path: JSON file holding a list of ``{"data_file": str, "prompt_en": str}``.
        limit: Keep only the first ``limit`` prompts (for quick runs); None keeps all.

    Returns:
        The prompts in file order, indexed from 0.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: Naming the file, the entry and the key, for a malformed list or entry.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt list {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"prompt list {path}: not valid JSON ({err})") from err
    if not isinstance(data, list) or not data:
        raise ValueError(f"prompt list {path}: expected a non-empty JSON list of {{data_file, prompt_en}}")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ValueError(f"benchmark.limit must be a positive int or null, got {limit!r}")

    entries = []
    for i, item in enumerate(data[:limit] if limit else data):
        if not isinstance(item, Mapping):
            raise ValueError(f"prompt list {path}: entry {i} is a {type(item).__name__}, expected an object")
        prompt = item.get("prompt_en")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompt list {path}: entry {i} has no non-empty string 'prompt_en'")
        data_file = item.get("data_file", "")
        if data_file is None:
            data_file = ""
        if not isinstance(data_file, str):
            raise ValueError(f"prompt list {path}: entry {i} 'data_file' must be a string, got {data_file!r}")
        # The prompt is kept verbatim: it is what the model is conditioned on.
        entries.append(PromptEntry(index=i, prompt=prompt, data_file=data_file))
    return entries


def shard_range(num_items: int, shard_index: int, num_shards: int) -> range:
    """The contiguous, balanced range of item indices of one shard.

    Args:
        num_items: Number of items to split (>= 0).
        shard_index: This shard, ``0 <= shard_index < num_shards``.
        num_shards: Number of shards (>= 1).

    Raises:
        ValueError: For an index out of range or a non-positive shard count.
    """
    check_shard(shard_index, num_shards)
    base, extra = divmod(num_items, num_shards)
    start = shard_index * base + min(shard_index, extra)
    return range(start, start + base + (1 if shard_index < extra else 0))


def check_shard(shard_index: int, num_shards: int, source: str = "") -> None:
    """Raise a one-line ValueError unless ``0 <= shard_index < num_shards``."""
    where = f" (from {source})" if source else ""
    for name, value in (("shard_index", shard_index), ("num_shards", num_shards)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{name} must be an int, got {value!r}{where}")
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}{where}")
    if not 0 <= shard_index < num_shards:
        raise ValueError(
            f"shard_index {shard_index} is out of range for num_shards {num_shards}: "
            f"expected 0 <= shard_index <= {num_shards - 1}{where}"
        )


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def resolve_shard(
    shard_index: int | None, num_shards: int | None, env: Mapping[str, str] | None = None
) -> tuple[int, int]:
    """The ``(shard_index, num_shards)`` of this task.

    Explicit values win; a value left as None comes from ``SLURM_ARRAY_TASK_ID`` /
    ``SLURM_ARRAY_TASK_COUNT`` when set, else from ``(0, 1)``. SLURM's task ids equal ``0..count-1``
    only for arrays written ``--array=0-(N-1)``, which `slurm/eval_array.sbatch` uses; an id outside
    that range is an error rather than a silent wrap-around.

    Raises:
        ValueError: Naming both values and where they came from, if ``index >= count`` or either is
            not a valid integer.
    """
    env = os.environ if env is None else env
    sources = []
    if shard_index is None:
        shard_index = _env_int(env, "SLURM_ARRAY_TASK_ID")
        sources.append("shard_index=SLURM_ARRAY_TASK_ID" if shard_index is not None else "shard_index=0")
        shard_index = 0 if shard_index is None else shard_index
    if num_shards is None:
        num_shards = _env_int(env, "SLURM_ARRAY_TASK_COUNT")
        sources.append("num_shards=SLURM_ARRAY_TASK_COUNT" if num_shards is not None else "num_shards=1")
        num_shards = 1 if num_shards is None else num_shards
    check_shard(shard_index, num_shards, ", ".join(sources))
    return shard_index, num_shards


def describe_shards(entries: Sequence[PromptEntry], num_shards: int) -> list[str]:
    """One line per shard, ``shard I/N: K prompts (first..last)``, as the dry run prints them."""
    lines = []
    for i in range(num_shards):
        part = shard_range(len(entries), i, num_shards)
        if len(part):
            span = f"({entries[part.start].index}..{entries[part.stop - 1].index})"
        else:
            span = "(none)"
        lines.append(f"shard {i}/{num_shards}: {len(part)} prompts {span}")
    return lines

"""A Wan DiT built from a preset (random weights, or on the meta device), and the dtypes it runs in.

* `DTYPES` and `as_dtype`: the dtype names t3 accepts (``float32``, ``bfloat16``, ``float16``; ``fp32``,
  ``bf16``, ``fp16`` and ``half`` as aliases), in configs, on command lines and in the loaders;
* `dit_from_preset`: the architecture of a preset with seeded random weights (tests, timings, the
  ``random_init`` of training), or on ``device="meta"`` without memory (dry runs, parameter counts);
* `cast_dit` and `cast_state_dict`: a cast to a compute dtype that keeps diffusers' fp32 modules (norms,
  the time embedder) in float32, as ``from_pretrained(torch_dtype=...)`` does; a plain ``.to(bf16)``
  would also cast the AdaLN tables and the time embedder, which Wan keeps in float32.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from t3.models.presets import dit_config

__all__ = ["DTYPES", "as_dtype", "cast_dit", "cast_state_dict", "dit_from_preset"]

#: The dtype names, each with its torch dtype.
DTYPES: Mapping[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``dtype`` as a torch dtype: a name of `DTYPES` or an alias (case-insensitive, ``torch.`` allowed).

    Raises:
        ValueError: For an unknown name, listing the accepted ones.
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).removeprefix("torch.").lower()
    key = _ALIASES.get(key, key)
    if key not in DTYPES:
        accepted = sorted([*DTYPES, *_ALIASES])
        raise ValueError(f"unknown dtype {dtype!r}; expected a torch.dtype or one of {accepted}")
    return DTYPES[key]


def dit_from_preset(
    preset: str,
    *,
    device: torch.device | str | None = None,
    seed: int = 0,
    num_layers: int | None = None,
) -> nn.Module:
    """A ``WanTransformer3DModel`` of ``preset`` with random weights drawn from ``seed``, in train mode.

    The global random state is left as it was. On ``device="meta"`` nothing is allocated or drawn.

    Args:
        preset: A `t3.models.presets` name.
        device: Where the parameters are created and initialised (seconds for 5B parameters on a GPU);
            None: the CPU.
        seed: Seed of the initial weights.
        num_layers: Fewer blocks than the preset (e.g. one period of a T3 schedule).
    """
    from diffusers import WanTransformer3DModel

    config = dit_config(preset)
    if num_layers is not None:
        config["num_layers"] = num_layers
    device = torch.device("cpu" if device is None else device)
    if device.type == "meta":
        with device:
            return WanTransformer3DModel(**config)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(seed)
        return WanTransformer3DModel(**config)


def _kept_in_fp32(name: str, dtype: torch.dtype, keep_fp32: Iterable[str]) -> bool:
    return dtype in (torch.float16, torch.bfloat16) and any(k in name.split(".") for k in keep_fp32)


def cast_state_dict(
    state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype, keep_fp32: Iterable[str] | None
) -> dict[str, torch.Tensor]:
    """Floating tensors of ``state_dict`` in ``dtype``, those of the modules ``keep_fp32`` in float32."""
    keep = list(keep_fp32 or [])
    return {
        name: tensor
        if not tensor.is_floating_point()
        else tensor.float()
        if _kept_in_fp32(name, dtype, keep)
        else tensor.to(dtype)
        for name, tensor in state_dict.items()
    }


@torch.no_grad()
def cast_dit(dit: nn.Module, dtype: torch.dtype) -> bool:
    """Cast the DiT's parameters to ``dtype`` in place, keeping its ``_keep_in_fp32_modules`` in float32.

    Nothing is done when every floating parameter outside those modules already has ``dtype``.

    Returns:
        Whether anything was cast.
    """
    keep = getattr(dit, "_keep_in_fp32_modules", None) or []
    params = [(name, p) for name, p in dit.named_parameters() if p.is_floating_point()]
    if all(p.dtype == dtype or any(k in name.split(".") for k in keep) for name, p in params):
        return False
    for name, param in params:
        target = torch.float32 if _kept_in_fp32(name, dtype, keep) else dtype
        if param.dtype != target:
            param.data = param.data.to(target)
    return True

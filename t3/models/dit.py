"""Load and save the Wan DiT (``diffusers.WanTransformer3DModel``) from local files, in either key format.

Accepted checkpoints (nothing is ever downloaded):

* a diffusers folder: ``config.json`` + ``diffusion_pytorch_model.safetensors`` or shards with a
  ``diffusion_pytorch_model.safetensors.index.json`` (a pipeline folder with a ``transformer/`` subfolder
  works too);
* the original Wan release format: a folder (Wan's ``config.json`` + one or more ``.safetensors``) or a single
  ``.safetensors`` file, optionally sharded as ``<stem>-00001-of-0000N.safetensors``. A bare file carries no
  architecture, so it needs ``preset=`` unless it was written by :func:`save_dit` (which records the config in
  the file's metadata);
* either of the above with all keys under a wrapper prefix such as ``model.`` or ``dit.`` (as in training
  checkpoints, e.g. the T3-Video releases).

Loading reads only the safetensors headers first and checks names and shapes against the architecture
(built on the meta device), so a wrong file fails in milliseconds with a one-line error, before any weights
are read or allocated.

Every checkpoint `save_dit` writes keeps the model's T3 record (`t3.models.record`: the schedule the
weights were trained with) in its config; `load_dit` transforms the model with that schedule by default
and refuses a different explicit one unless ``allow_schedule_change=True``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import WanTransformer3DModel
from safetensors import safe_open
from safetensors.torch import save_file

from t3.attention import Schedule, get_schedule
from t3.io import atomic_folder, atomic_path, give_umask_mode
from t3.models.build import as_dtype, cast_state_dict
from t3.models.presets import DIT_PRESETS, dit_config, preset_names
from t3.models.record import RECORD_KEY, T3Record
from t3.models.wan_keys import (
    detect_key_format,
    diffusers_config_to_wan,
    diffusers_key_to_wan,
    diffusers_to_wan,
    strip_known_prefix,
    wan_config_to_diffusers,
    wan_key_to_diffusers,
)

__all__ = ["CheckpointMismatchError", "load_dit", "match_preset", "read_record", "save_dit"]

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
CONFIG_NAME = "config.json"
# safetensors metadata key holding the Wan-style config in single files written by save_dit.
METADATA_CONFIG_KEY = "t3_config"

_SHARD_RE = re.compile(r"^(?P<stem>.+)-(?P<index>\d+)-of-(?P<total>\d+)\.safetensors$")
_EXPECTED = "expected a diffusers folder with config.json or Wan .safetensors files"


class CheckpointMismatchError(ValueError):
    """The checkpoint's parameter names do not match the architecture (missing or unexpected keys)."""


@dataclass
class _Checkpoint:
    """What the safetensors headers say about a checkpoint, before any tensor is read."""

    source: Path  # the path the user passed, for messages
    files: list[Path]
    config: dict[str, Any] | None  # parsed config.json or metadata config, if any
    config_origin: str | None  # where `config` came from, for messages
    prefix: str  # wrapper prefix shared by all keys ("" if none)
    key_format: Literal["wan", "diffusers"]
    raw_key: dict[str, str]  # diffusers-style name -> name in the file
    shape: dict[str, tuple[int, ...]]  # diffusers-style name -> shape
    file_of: dict[str, Path]  # diffusers-style name -> file holding it


# --- loading ----------------------------------------------------------------------------------------------


def load_dit(
    path: str | os.PathLike,
    preset: str | None = None,
    *,
    allow_partial: bool = False,
    dtype: torch.dtype | str | None = None,
    schedule: Schedule | str | None = None,
    allow_schedule_change: bool = False,
    transform: bool = True,
) -> WanTransformer3DModel:
    """Load a Wan DiT from a local checkpoint in diffusers or original Wan format.

    A checkpoint with a T3 record (`t3.models.record`; every t3 export has one) comes back transformed
    with the schedule it was trained with; one without (a Wan release) comes back plain, as stored,
    unless ``schedule`` is given.

    Args:
        path: A checkpoint folder or ``.safetensors`` file (see the module docstring for accepted layouts).
        preset: Architecture to build (one of :func:`t3.models.presets.preset_names`). Required for bare Wan
            files; when given it overrides any ``config.json`` next to the weights.
        allow_partial: Load even if the checkpoint lacks some parameters (they keep their random init) or
            has extra ones (ignored). Both are always logged.
        dtype: Cast floating-point weights to this dtype (``torch.bfloat16`` or ``"bf16"`` ...). As in
            diffusers, the modules in ``WanTransformer3DModel._keep_in_fp32_modules`` (norms, AdaLN tables,
            time embedder) stay in float32 when casting to 16 bits. ``None`` keeps the stored dtypes
            exactly, which makes load -> save bit-identical.
        schedule: A T3 `Schedule` or preset name to transform with; None: the recorded one, if any.
        allow_schedule_change: Use ``schedule`` even where the checkpoint's record names another one.
        transform: False returns the plain model (the record is still on ``model.config``).

    Returns:
        The model, on CPU, in eval mode, transformed with the chosen schedule (see above).

    Raises:
        FileNotFoundError: If ``path`` (or one of its shards) does not exist or holds no weights.
        ValueError: If the architecture cannot be determined, the keys are neither Wan nor diffusers names,
            or a tensor's shape does not match the architecture.
        CheckpointMismatchError: If keys are missing or unexpected and ``allow_partial`` is False.
        t3.models.record.ScheduleConflictError: If ``schedule`` differs from the recorded one and
            ``allow_schedule_change`` is False (checked before any weight is read).
    """
    from t3.models.record import choose_schedule

    path = Path(path)
    target_dtype = as_dtype(dtype)
    if preset is not None:
        config, config_origin = dit_config(preset), f"preset {preset!r}"  # validates the name early
    ckpt = _inspect(path)
    if preset is None:
        config, config_origin = _config_from_checkpoint(ckpt)
    record = _record(ckpt)
    requested = get_schedule(schedule) if isinstance(schedule, str) else schedule
    chosen = choose_schedule(record, requested, allow_change=allow_schedule_change, source=str(path))

    # Build the architecture without memory: parameters on the meta device, (non-persistent RoPE) buffers
    # real, as diffusers' own loader does.
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = WanTransformer3DModel.from_config(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}

    missing, unexpected = _check_against(ckpt, expected, config_origin)
    summary = (
        f"DiT checkpoint {path} ({ckpt.key_format} keys"
        + (f", prefix {ckpt.prefix!r} stripped" if ckpt.prefix else "")
        + f", architecture from {config_origin}): {len(ckpt.shape)} tensors, "
        f"{len(missing)} missing, {len(unexpected)} unexpected"
    )
    if missing or unexpected:
        logger.warning(
            "%s; missing e.g. %s; unexpected e.g. %s",
            summary,
            [_file_name(ckpt, k) for k in missing[:5]],
            [ckpt.raw_key[k] for k in unexpected[:5]],
        )
        if not allow_partial:
            raise CheckpointMismatchError(
                f"{path}: checkpoint does not match the architecture from {config_origin}: "
                f"{len(missing)} missing key(s) {[_file_name(ckpt, k) for k in missing[:3]]}, "
                f"{len(unexpected)} unexpected key(s) "
                f"{[ckpt.raw_key[k] for k in unexpected[:3]]}; pass allow_partial=True to load anyway"
            )
    else:
        logger.info(summary)

    state_dict = _read_tensors(ckpt, [k for k in expected if k in ckpt.shape])
    if target_dtype is not None:
        state_dict = cast_state_dict(state_dict, target_dtype, model._keep_in_fp32_modules)

    if missing:
        # Missing parameters need real (random) initial values, so build the model for real this time.
        model = WanTransformer3DModel.from_config(config)
        initial = {k: v for k, v in model.state_dict().items() if k in set(missing)}
        if target_dtype is not None:
            initial = cast_state_dict(initial, target_dtype, model._keep_in_fp32_modules)
        state_dict = {**initial, **state_dict}
    # assign=True adopts the loaded tensors as they are (no copy, stored dtype preserved).
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.eval()
    if record is not None:  # kept on the model, so a save keeps it and t3.transform(model) reads it
        model.register_to_config(**{RECORD_KEY: record.as_dict()})
    if transform and chosen is not None:
        import t3

        logger.info("%s: T3 schedule %r%s", path, chosen.name, " (its record)" if requested is None else "")
        t3.transform(model, chosen, allow_schedule_change=allow_schedule_change)
    return model


def read_record(path: str | os.PathLike) -> T3Record | None:
    """The T3 record of a DiT checkpoint (any layout `load_dit` reads), or None; reads no tensor.

    Raises:
        FileNotFoundError: No checkpoint at ``path``.
        ValueError: A malformed record, naming the file.
    """
    config, origin = _checkpoint_config(*_locate(Path(path)))
    return None if config is None else T3Record.from_config(config, source=origin or str(path))


def _record(ckpt: _Checkpoint) -> T3Record | None:
    if ckpt.config is None:
        return None
    return T3Record.from_config(ckpt.config, source=ckpt.config_origin or str(ckpt.source))


def _inspect(path: Path) -> _Checkpoint:
    """Locate the weight files and read their headers (names, shapes, metadata); no tensor is loaded."""
    files, config_file = _locate(path)
    shape: dict[str, tuple[int, ...]] = {}
    file_of: dict[str, Path] = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                if key in file_of:
                    raise ValueError(f"{file}: tensor {key!r} is also stored in {file_of[key]}")
                shape[key] = tuple(f.get_slice(key).get_shape())
                file_of[key] = file
    if not shape:
        raise ValueError(f"{files[0]}: no tensors found ({_EXPECTED})")

    prefix = strip_known_prefix(shape)
    bare = [k[len(prefix) :] for k in shape]
    key_format = detect_key_format(bare)
    if key_format is None:
        raise ValueError(
            f"{files[0]}: keys are neither original Wan nor diffusers WanTransformer3DModel names "
            f"(first keys: {sorted(shape)[:3]})"
        )

    # Index everything by the diffusers name the model expects; unknown names keep their own name so they
    # are reported as unexpected.
    raw_key: dict[str, str] = {}
    for key, name in zip(list(shape), bare, strict=True):
        new = (wan_key_to_diffusers(name) or name) if key_format == "wan" else name
        if new in raw_key:
            raise ValueError(f"{file_of[key]}: {raw_key[new]!r} and {key!r} both map to parameter {new!r}")
        raw_key[new] = key
    config, config_origin = _checkpoint_config(files, config_file)
    return _Checkpoint(
        source=path,
        files=files,
        config=config,
        config_origin=config_origin,
        prefix=prefix,
        key_format=key_format,
        raw_key=raw_key,
        shape={new: shape[raw] for new, raw in raw_key.items()},
        file_of={new: file_of[raw] for new, raw in raw_key.items()},
    )


def _checkpoint_config(
    files: list[Path], config_file: Path | None
) -> tuple[dict[str, Any] | None, str | None]:
    """The checkpoint's own config and where it came from: ``config.json``, else the config that
    `save_dit` puts in a single file's safetensors metadata, else None."""
    if config_file is not None:
        return json.loads(config_file.read_text()), str(config_file)
    with safe_open(files[0], framework="pt") as f:
        metadata = f.metadata() or {}
    if METADATA_CONFIG_KEY in metadata:
        return json.loads(metadata[METADATA_CONFIG_KEY]), f"{files[0]} metadata"
    return None, None


def _locate(path: Path) -> tuple[list[Path], Path | None]:
    """The ``.safetensors`` files of a checkpoint and its ``config.json`` (or None)."""
    if not path.exists():
        raise FileNotFoundError(f"DiT checkpoint not found: {path} ({_EXPECTED})")

    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: unsupported DiT checkpoint file ({_EXPECTED}; .pth/.bin are not read)")
        files = _shard_set(path) if _SHARD_RE.match(path.name) else [path]
        # A standard-named file sits in its checkpoint folder, whose config.json then describes it.
        sibling = path.parent / CONFIG_NAME
        config = sibling if path.name.startswith("diffusion_pytorch_model") and sibling.is_file() else None
        return files, config

    # A diffusers pipeline folder keeps the DiT in transformer/.
    if not (path / CONFIG_NAME).exists() and (path / "transformer" / CONFIG_NAME).exists():
        path = path / "transformer"
    config = path / CONFIG_NAME if (path / CONFIG_NAME).is_file() else None

    index = path / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = [path / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(f"DiT checkpoint shard not found: {file} (listed in {index})")
        return files, config
    if (path / WEIGHTS_NAME).is_file():
        return [path / WEIGHTS_NAME], config
    candidates = sorted(path.glob("*.safetensors"))
    if not candidates:
        raise FileNotFoundError(f"DiT checkpoint not found: no .safetensors files in {path} ({_EXPECTED})")
    if len(candidates) == 1:
        return candidates, config
    shards = [_SHARD_RE.match(c.name) for c in candidates]
    if all(shards) and len({(m["stem"], m["total"]) for m in shards}) == 1:  # one shard set, no index
        return _shard_set(candidates[0]), config
    raise ValueError(
        f"{path}: several .safetensors files ({[c.name for c in candidates][:5]}) and no {INDEX_NAME}; "
        "pass the file to load"
    )


def _shard_set(file: Path) -> list[Path]:
    """All shards ``<stem>-0000i-of-0000N.safetensors`` of the set ``file`` belongs to, checked complete."""
    match = _SHARD_RE.match(file.name)
    assert match is not None
    stem, width, total = match["stem"], len(match["index"]), int(match["total"])
    files = [
        file.parent / f"{stem}-{i:0{width}d}-of-{match['total']}.safetensors" for i in range(1, total + 1)
    ]
    for shard in files:
        if not shard.is_file():
            raise FileNotFoundError(f"DiT checkpoint shard not found: {shard} (part of a {total}-shard set)")
    return files


def _config_from_checkpoint(ckpt: _Checkpoint) -> tuple[dict[str, Any], str]:
    """The diffusers kwargs described by a checkpoint's own config, or an error asking for ``preset=``."""
    if ckpt.config is None:
        raise ValueError(
            f"{ckpt.source} looks like {'original Wan' if ckpt.key_format == 'wan' else 'diffusers'} keys "
            f"without a config; pass preset= one of {preset_names()}"
        )
    cfg = ckpt.config
    if cfg.get("_class_name") == "WanTransformer3DModel" or "num_attention_heads" in cfg:
        return dict(cfg), ckpt.config_origin
    if "dim" in cfg and "num_heads" in cfg:  # Wan release config
        try:
            return wan_config_to_diffusers(cfg), ckpt.config_origin
        except ValueError as err:
            raise ValueError(f"{ckpt.config_origin}: {err}; pass preset= one of {preset_names()}") from None
    raise ValueError(
        f"{ckpt.config_origin} is neither a diffusers WanTransformer3DModel config nor a Wan config; "
        f"pass preset= one of {preset_names()}"
    )


def _check_against(
    ckpt: _Checkpoint, expected: Mapping[str, tuple[int, ...]], config_origin: str
) -> tuple[list[str], list[str]]:
    """Missing and unexpected names; raises on a shape mismatch, naming the first one."""
    mismatched = [k for k, shape in expected.items() if ckpt.shape.get(k, shape) != shape]
    if mismatched:
        name = mismatched[0]
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        raise ValueError(
            f"{ckpt.file_of[name]}: shape mismatch for {ckpt.raw_key[name]!r}: expected {expected[name]} "
            f"(architecture from {config_origin}), found {ckpt.shape[name]}{more}"
        )
    missing = [k for k in expected if k not in ckpt.shape]
    unexpected = [k for k in ckpt.shape if k not in expected]
    return missing, unexpected


def _file_name(ckpt: _Checkpoint, name: str) -> str:
    """How a (missing) diffusers-named parameter would be spelled in this checkpoint's file."""
    if ckpt.key_format == "wan":
        name = diffusers_key_to_wan(name) or name
    return ckpt.prefix + name


def _read_tensors(ckpt: _Checkpoint, names: list[str]) -> dict[str, torch.Tensor]:
    """Read the given (diffusers-named) tensors, file by file."""
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(ckpt.file_of[name], []).append(name)
    out: dict[str, torch.Tensor] = {}
    for file, file_names in by_file.items():
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in file_names:
                out[name] = f.get_tensor(ckpt.raw_key[name])
    return {name: out[name] for name in names}  # model order, for readable state dicts


# --- saving -----------------------------------------------------------------------------------------------


def match_preset(config: Mapping[str, Any]) -> str | None:
    """The preset whose architecture equals ``config`` (a ``WanTransformer3DModel`` config), or None."""

    def norm(cfg: Mapping[str, Any]) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items() if not k.startswith("_")}

    ours = norm(config)
    for name, preset in DIT_PRESETS.items():
        if all(ours.get(k) == v for k, v in norm(preset).items()):
            return name
    return None


def save_dit(
    model: WanTransformer3DModel,
    path: str | os.PathLike,
    format: Literal["diffusers", "wan"] = "diffusers",
    *,
    max_shard_size: int | str = "10GB",
    preset: str | None = None,
    overwrite: bool = False,
    record: T3Record | None = None,
) -> Path:
    """Save a DiT as a diffusers folder or in the original Wan key format, atomically, with its T3 record.

    Everything is written under a temporary name in the destination's folder and renamed into place only
    when complete, so an interrupted save never leaves a half-written checkpoint at ``path``.

    Args:
        model: The model to save (its state dict must use only the ``WanTransformer3DModel`` names).
        path: Destination. For ``"diffusers"`` a folder. For ``"wan"`` a folder
            (``diffusion_pytorch_model.safetensors`` or shards + index, and a Wan-style ``config.json``) or,
            if it ends in ``.safetensors``, a single file with the config in its metadata (never sharded).
        format: ``"diffusers"`` or ``"wan"`` (original key names, bit-identical to the loaded tensors).
        max_shard_size: Largest shard, in bytes or as ``"5GB"``-style string.
        preset: Preset name to record in the Wan config; found from the model's config if not given.
        overwrite: Replace an existing checkpoint at ``path``.
        record: The T3 record to write into the checkpoint's config (`t3.models.record`); None keeps
            the one on ``model.config`` (set by `t3.transform` or `load_dit`), if any.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        FileExistsError: If ``path`` exists and ``overwrite`` is False.
        KeyError: For ``"wan"``, if the state dict has names outside the Wan mapping.
    """
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile, whose names carry a prefix
    path = Path(path)
    if format not in ("diffusers", "wan"):
        raise ValueError(f"unknown DiT checkpoint format {format!r}; expected 'diffusers' or 'wan'")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)

    record = record or T3Record.from_config(model.config)
    recorded = {} if record is None else {RECORD_KEY: record.as_dict()}
    if format == "diffusers":
        with atomic_folder(path) as tmp:
            model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
            if recorded:  # written into the saved config, never onto the caller's model
                config_file = tmp / CONFIG_NAME
                config_file.write_text(
                    json.dumps({**json.loads(config_file.read_text()), **recorded}, indent=2)
                )
            give_umask_mode(tmp)  # safetensors writes owner-only files
        logger.info("Saved DiT (diffusers format) to %s", path)
        return path

    # Plain CPU tensors: safetensors refuses non-contiguous or device tensors.
    state_dict = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    state_dict = diffusers_to_wan(state_dict, strict=True)
    wan_config = {**diffusers_config_to_wan(model.config, preset or match_preset(model.config)), **recorded}
    if path.suffix == ".safetensors":
        with atomic_path(path) as tmp:
            save_file(state_dict, tmp, metadata={"format": "pt", METADATA_CONFIG_KEY: json.dumps(wan_config)})
            give_umask_mode(tmp)
    else:
        with atomic_folder(path) as tmp:
            _save_sharded(state_dict, tmp, max_shard_size)
            (tmp / CONFIG_NAME).write_text(json.dumps(wan_config, indent=2) + "\n")
            give_umask_mode(tmp)
    logger.info("Saved DiT (Wan format) to %s", path)
    return path


def _save_sharded(state_dict: dict[str, torch.Tensor], folder: Path, max_shard_size: int | str) -> None:
    """Write ``diffusion_pytorch_model.safetensors``, or Wan-style shards plus an index if too large."""
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(
        state_dict,
        filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
        max_shard_size=max_shard_size,
    )
    for filename, names in split.filename_to_tensors.items():
        save_file({n: state_dict[n] for n in names}, folder / filename, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

"""Parameter-name conversion between the original Wan release format and diffusers' ``WanTransformer3DModel``.

Both formats store the same tensors with the same shapes; only the names differ. The mapping is spelled out
as explicit tables (checked against diffusers' ``convert_wan_transformer_to_diffusers``) so it can be read,
inverted, and tested key by key. Two details worth knowing:

* Original Wan names its cross-attention LayerNorm ``norm3`` (``norm1``/``norm2`` have no weights), while
  diffusers calls it ``norm2`` (its ``norm1``/``norm3`` have no weights). So ``norm3 <-> norm2``.
* The AdaLN tables are ``modulation`` in Wan and ``scale_shift_table`` in diffusers, per block and in the head.

Checkpoints written by training frameworks often wrap the model, prefixing every key (``model.``,
``module.``, ``dit.`` ...); :func:`strip_known_prefix` removes such a prefix when *all* keys share it.

The Wan releases also name their ``config.json`` fields differently (``dim``, ``num_heads``, ``in_dim`` ...);
:func:`wan_config_to_diffusers` / :func:`diffusers_config_to_wan` translate those.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, Literal, TypeVar

__all__ = [
    "KNOWN_PREFIXES",
    "T3_DIFFUSERS_CONFIG_KEY",
    "diffusers_config_to_wan",
    "wan_config_to_diffusers",
    "detect_key_format",
    "diffusers_key_to_wan",
    "diffusers_to_wan",
    "strip_known_prefix",
    "wan_key_to_diffusers",
    "wan_to_diffusers",
]

T = TypeVar("T")

# Modules outside the transformer blocks: original Wan name -> diffusers name. Each maps its ``.weight`` and
# ``.bias`` (when present) one to one.
_TOP_MODULES: dict[str, str] = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
    # Image-conditioned (I2V / FLF2V) Wan only; harmless for text-to-video models.
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
}

# Bare parameters (no .weight/.bias suffix) outside the blocks.
_TOP_PARAMS: dict[str, str] = {
    "head.modulation": "scale_shift_table",
    "img_emb.emb_pos": "condition_embedder.image_embedder.pos_embed",
}

# Modules inside ``blocks.{i}.``.
_BLOCK_MODULES: dict[str, str] = {
    # Self-attention.
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "self_attn.norm_q": "attn1.norm_q",
    "self_attn.norm_k": "attn1.norm_k",
    # Cross-attention and its input LayerNorm (the only affine norm in a block).
    "norm3": "norm2",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "cross_attn.norm_q": "attn2.norm_q",
    "cross_attn.norm_k": "attn2.norm_k",
    # Image branch of the cross-attention (I2V only).
    "cross_attn.k_img": "attn2.add_k_proj",
    "cross_attn.v_img": "attn2.add_v_proj",
    "cross_attn.norm_k_img": "attn2.norm_added_k",
    # Feed-forward: Linear, GELU(tanh), Linear.
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}

# Bare parameters inside ``blocks.{i}.``.
_BLOCK_PARAMS: dict[str, str] = {
    "modulation": "scale_shift_table",
}

_LEAVES = ("weight", "bias")
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")

#: Wrapper prefixes stripped by :func:`strip_known_prefix`, longest first so ``model.diffusion_model.``
#: wins over ``model.``.
KNOWN_PREFIXES: tuple[str, ...] = (
    "model.diffusion_model.",
    "diffusion_model.",
    "_orig_mod.",
    "transformer.",
    "module.",
    "model.",
    "dit.",
    "net.",
)


def _invert(table: Mapping[str, str]) -> dict[str, str]:
    inverse = {v: k for k, v in table.items()}
    assert len(inverse) == len(table), "mapping tables must be one to one"
    return inverse


def _rename(
    key: str,
    top_modules: Mapping[str, str],
    top_params: Mapping[str, str],
    block_modules: Mapping[str, str],
    block_params: Mapping[str, str],
) -> str | None:
    """Rename one key using the given tables; None when no table covers it."""
    match = _BLOCK_RE.match(key)
    if match:
        prefix, rest = f"blocks.{match.group(1)}.", match.group(2)
        modules, params = block_modules, block_params
    else:
        prefix, rest = "", key
        modules, params = top_modules, top_params
    if rest in params:
        return prefix + params[rest]
    module, _, leaf = rest.rpartition(".")
    if leaf in _LEAVES and module in modules:
        return f"{prefix}{modules[module]}.{leaf}"
    return None


_TOP_MODULES_INV = _invert(_TOP_MODULES)
_TOP_PARAMS_INV = _invert(_TOP_PARAMS)
_BLOCK_MODULES_INV = _invert(_BLOCK_MODULES)
_BLOCK_PARAMS_INV = _invert(_BLOCK_PARAMS)


def wan_key_to_diffusers(key: str) -> str | None:
    """Diffusers name of an original Wan parameter name, or None if the name is not a known Wan parameter."""
    return _rename(key, _TOP_MODULES, _TOP_PARAMS, _BLOCK_MODULES, _BLOCK_PARAMS)


def diffusers_key_to_wan(key: str) -> str | None:
    """Original Wan name of a diffusers parameter name, or None if the name is not a known diffusers parameter."""
    return _rename(key, _TOP_MODULES_INV, _TOP_PARAMS_INV, _BLOCK_MODULES_INV, _BLOCK_PARAMS_INV)


def _convert(state_dict: Mapping[str, T], rename, direction: str, strict: bool) -> dict[str, T]:
    out: dict[str, T] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        new_key = rename(key)
        if new_key is None:
            unknown.append(key)
            new_key = key  # non-strict: keep the name so the loader can report it as unexpected
        out[new_key] = value
    if unknown and strict:
        raise KeyError(f"{direction}: {len(unknown)} key(s) have no mapping, e.g. {unknown[:5]}")
    return out


def wan_to_diffusers(state_dict: Mapping[str, T], *, strict: bool = True) -> dict[str, T]:
    """Rename an original-Wan state dict to diffusers names (values are passed through untouched).

    Args:
        state_dict: Original Wan names (already stripped of any wrapper prefix).
        strict: Raise on names outside the mapping; otherwise keep them unchanged.

    Returns:
        A new dict, same values, diffusers names, same order.

    Raises:
        KeyError: If ``strict`` and some name has no mapping.
    """
    return _convert(state_dict, wan_key_to_diffusers, "wan -> diffusers", strict)


def diffusers_to_wan(state_dict: Mapping[str, T], *, strict: bool = True) -> dict[str, T]:
    """Rename a diffusers ``WanTransformer3DModel`` state dict to original Wan names; inverse of
    :func:`wan_to_diffusers`.

    Raises:
        KeyError: If ``strict`` and some name has no mapping.
    """
    return _convert(state_dict, diffusers_key_to_wan, "diffusers -> wan", strict)


def strip_known_prefix(keys: Iterable[str]) -> str:
    """The wrapper prefix shared by all ``keys`` (possibly nested, e.g. ``module.model.``), or ``""``.

    Only prefixes in :data:`KNOWN_PREFIXES` are considered, so a genuine parameter name is never cut.
    """
    keys = list(keys)
    stripped = ""
    while keys:
        for prefix in KNOWN_PREFIXES:
            if all(k.startswith(prefix) for k in keys):
                stripped += prefix
                keys = [k[len(prefix) :] for k in keys]
                break
        else:
            break
    return stripped


def detect_key_format(keys: Iterable[str]) -> Literal["wan", "diffusers"] | None:
    """Guess whether prefix-free ``keys`` use original Wan or diffusers names; None if neither.

    The decision counts the names each table recognises, so a few foreign keys (e.g. an extra adapter)
    do not flip it.
    """
    keys = list(keys)
    wan = sum(wan_key_to_diffusers(k) is not None for k in keys)
    diffusers = sum(diffusers_key_to_wan(k) is not None for k in keys)
    # ``patch_embedding.*`` is spelled the same in both formats, so it must not count for either.
    wan -= sum(k.startswith("patch_embedding.") for k in keys)
    diffusers -= sum(k.startswith("patch_embedding.") for k in keys)
    if wan <= 0 and diffusers <= 0:
        return None
    return "wan" if wan > diffusers else "diffusers"


# --- configs ---------------------------------------------------------------------------------------------
# The Wan releases ship a config.json with their own field names (dim, num_heads, in_dim, ...). These two
# functions translate it to and from WanTransformer3DModel keyword arguments.

#: Key under which :func:`diffusers_config_to_wan` stores the exact diffusers kwargs, so that a config we
#: wrote round-trips exactly even for settings the Wan fields cannot express.
T3_DIFFUSERS_CONFIG_KEY = "t3_diffusers_config"


def diffusers_config_to_wan(config: Mapping[str, Any], preset: str | None = None) -> dict[str, Any]:
    """A Wan-release-style ``config.json`` dict for a ``WanTransformer3DModel`` config.

    Args:
        config: ``WanTransformer3DModel`` kwargs (``model.config`` works; private ``_`` keys are dropped).
        preset: Preset name to record, if known.

    Returns:
        Wan fields (``dim``, ``num_heads``, ``num_layers``, ``ffn_dim``, ``in_dim``, ``out_dim``, ``text_len``,
        ``model_type`` ...) plus ``t3_preset`` and the exact diffusers kwargs under
        :data:`T3_DIFFUSERS_CONFIG_KEY`.
    """
    kwargs = {k: _jsonable(v) for k, v in dict(config).items() if not k.startswith("_")}
    heads, head_dim = kwargs["num_attention_heads"], kwargs["attention_head_dim"]
    if kwargs.get("image_dim") is not None:
        model_type = "i2v"
    elif kwargs["in_channels"] == 48:  # Wan2.2 VAE latents: the text-image-to-video 5B model
        model_type = "ti2v"
    else:
        model_type = "t2v"
    return {
        "_class_name": "WanModel",
        "model_type": model_type,
        "dim": heads * head_dim,
        "num_heads": heads,
        "num_layers": kwargs["num_layers"],
        "ffn_dim": kwargs["ffn_dim"],
        "freq_dim": kwargs["freq_dim"],
        "in_dim": kwargs["in_channels"],
        "out_dim": kwargs["out_channels"],
        "text_dim": kwargs["text_dim"],
        "text_len": 512,
        "patch_size": kwargs["patch_size"],
        "window_size": [-1, -1],
        "qk_norm": kwargs["qk_norm"] is not None,
        "cross_attn_norm": kwargs["cross_attn_norm"],
        "eps": kwargs["eps"],
        "t3_preset": preset,
        T3_DIFFUSERS_CONFIG_KEY: kwargs,
    }


def wan_config_to_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
    """``WanTransformer3DModel`` kwargs from a Wan-release-style ``config.json`` dict.

    Raises:
        ValueError: If a required Wan field is missing or the model type is not a text(-image)-to-video DiT.
    """
    if T3_DIFFUSERS_CONFIG_KEY in config:
        return dict(config[T3_DIFFUSERS_CONFIG_KEY])
    model_type = config.get("model_type", "t2v")
    if model_type not in ("t2v", "ti2v"):
        raise ValueError(f"unsupported Wan model_type {model_type!r} (expected 't2v' or 'ti2v')")
    required = ("dim", "num_heads", "num_layers", "ffn_dim", "in_dim", "out_dim")
    missing = [k for k in required if k not in config]
    if missing:
        raise ValueError(f"Wan config lacks field(s) {missing}")
    return {
        "patch_size": tuple(config.get("patch_size", (1, 2, 2))),
        "num_attention_heads": config["num_heads"],
        "attention_head_dim": config["dim"] // config["num_heads"],
        "in_channels": config["in_dim"],
        "out_channels": config["out_dim"],
        "text_dim": config.get("text_dim", 4096),
        "freq_dim": config.get("freq_dim", 256),
        "ffn_dim": config["ffn_dim"],
        "num_layers": config["num_layers"],
        "cross_attn_norm": config.get("cross_attn_norm", True),
        "qk_norm": "rms_norm_across_heads" if config.get("qk_norm", True) else None,
        "eps": config.get("eps", 1e-6),
    }


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value

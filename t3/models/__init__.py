"""Pretrained parts of a Wan video model (DiT, VAE, text encoder), loaded and saved from local paths only.

Nothing here downloads: every loader takes a local file or folder and fails with a one-line error naming
the path and what was expected. Tiny random stand-ins for tests live in :mod:`t3.models.tiny`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from t3.models.presets import (
    DIT_PRESETS,
    MODEL_SPECS,
    ModelSpec,
    dit_config,
    get_spec,
    preset_names,
)

# The loaders import diffusers and transformers (seconds); presets do not. Importing the loaders on
# first use keeps config validation (which only needs presets) fast.
_LAZY = {
    "CheckpointMismatchError": "t3.models.dit",
    "load_dit": "t3.models.dit",
    "match_preset": "t3.models.dit",
    "read_record": "t3.models.dit",
    "save_dit": "t3.models.dit",
    "PromptEmbeddingCache": "t3.models.text_encoder",
    "TextEncoder": "t3.models.text_encoder",
    "clean_prompt": "t3.models.text_encoder",
    "load_text_encoder": "t3.models.text_encoder",
    "decode_latents": "t3.models.vae",
    "denormalize_latents": "t3.models.vae",
    "encode_video": "t3.models.vae",
    "load_vae": "t3.models.vae",
    "normalize_latents": "t3.models.vae",
    "vae_tiling": "t3.models.vae",
    "diffusers_to_wan": "t3.models.wan_keys",
    "wan_to_diffusers": "t3.models.wan_keys",
}

if TYPE_CHECKING:
    from t3.models.dit import CheckpointMismatchError, load_dit, match_preset, read_record, save_dit
    from t3.models.text_encoder import PromptEmbeddingCache, TextEncoder, clean_prompt, load_text_encoder
    from t3.models.vae import (
        decode_latents,
        denormalize_latents,
        encode_video,
        load_vae,
        normalize_latents,
        vae_tiling,
    )
    from t3.models.wan_keys import diffusers_to_wan, wan_to_diffusers


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 't3.models' has no attribute {name!r}")


__all__ = [
    "DIT_PRESETS",
    "MODEL_SPECS",
    "CheckpointMismatchError",
    "ModelSpec",
    "PromptEmbeddingCache",
    "TextEncoder",
    "clean_prompt",
    "decode_latents",
    "denormalize_latents",
    "diffusers_to_wan",
    "dit_config",
    "encode_video",
    "get_spec",
    "load_dit",
    "load_text_encoder",
    "load_vae",
    "match_preset",
    "normalize_latents",
    "preset_names",
    "read_record",
    "save_dit",
    "vae_tiling",
    "wan_to_diffusers",
]

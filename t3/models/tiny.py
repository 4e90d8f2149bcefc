"""Tiny, randomly initialised stand-ins for the DiT, the VAE and the text encoder, for tests.

They share the real classes (``WanTransformer3DModel``, ``AutoencoderKLWan``, ``UMT5EncoderModel``) and fit
together: the VAE's ``z_dim`` equals the DiT's ``in_channels`` and the text encoder's ``d_model`` equals the
DiT's ``text_dim``. Everything is built offline and deterministically from ``seed`` without touching the global
RNG, so tests can build them freely.

This module's API is used by tests across the repository; keep it stable.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel

from t3.io import give_umask_mode
from t3.models.presets import dit_config

if TYPE_CHECKING:
    from t3.models.text_encoder import TextEncoder

__all__ = [
    "TINY_DIT_CONFIG",
    "TINY_TEXT_DIM",
    "TINY_TEXT_ENCODER_CONFIG",
    "TINY_VAE_CONFIG",
    "save_tiny_dit",
    "save_tiny_text_encoder",
    "save_tiny_vae",
    "tiny_dit",
    "tiny_text_encoder",
    "tiny_vae",
]

#: ``WanTransformer3DModel`` kwargs of the tiny DiT (the ``"tiny"`` preset).
TINY_DIT_CONFIG: dict[str, Any] = dit_config("tiny")

#: Hidden size of the tiny text encoder, equal to the tiny DiT's ``text_dim``.
TINY_TEXT_DIM: int = TINY_DIT_CONFIG["text_dim"]

#: ``AutoencoderKLWan`` kwargs of the tiny VAE: Wan2.1 geometry (4x8x8 compression) with 4 latent channels.
#: The latent statistics are deliberately not 0/1 so tests exercise the normalisation.
TINY_VAE_CONFIG: dict[str, Any] = {
    "base_dim": 4,
    "z_dim": TINY_DIT_CONFIG["in_channels"],
    "dim_mult": [1, 1, 1, 1],
    "num_res_blocks": 1,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
    "latents_mean": [0.1, -0.2, 0.3, -0.1],
    "latents_std": [1.5, 0.8, 1.2, 2.0],
}

#: ``UMT5Config`` kwargs of the tiny text encoder (``vocab_size`` is filled in from the tiny tokenizer).
TINY_TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "d_model": TINY_TEXT_DIM,
    "d_kv": 8,
    "d_ff": 32,
    "num_layers": 2,
    "num_heads": 2,
    "relative_attention_num_buckets": 8,
    "relative_attention_max_distance": 32,
    "dropout_rate": 0.0,
}

# A few whole words so tokenisation is not purely per character; everything else falls back to characters.
_TINY_WORDS = ("the", "a", "cat", "dog", "video", "of", "in", "and", "on", "with", "red", "blue", "city")


def tiny_dit(seed: int = 0) -> WanTransformer3DModel:
    """A randomly initialised tiny DiT (preset ``"tiny"``) in eval mode, fp32, on CPU.

    Its RoPE table covers 32 positions per axis after patching: latents up to 32 frames x 64 x 64.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = WanTransformer3DModel(**TINY_DIT_CONFIG)
    return model.eval()


def tiny_vae(seed: int = 0) -> AutoencoderKLWan:
    """A randomly initialised tiny Wan VAE (4 latent channels, 4x8x8 compression) in eval mode, fp32, on CPU."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKLWan(**TINY_VAE_CONFIG)
    return vae.eval()


def _tiny_tokenizer():
    """A T5-style Unigram tokenizer over ASCII characters and a few words, built without any download."""
    from transformers import T5Tokenizer

    # T5/umT5 layout: <pad>=0, </s>=1, <unk>=2; scores favour whole words over characters.
    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + word, -3.0) for word in _TINY_WORDS]
    vocab += [(char, -5.0) for char in string.ascii_letters + string.digits + string.punctuation]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def _tiny_umt5(tokenizer, seed: int):
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        **TINY_TEXT_ENCODER_CONFIG,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UMT5EncoderModel(config).eval()


def tiny_text_encoder(seed: int = 0) -> TextEncoder:
    """A randomly initialised tiny umT5 encoder and its tokenizer, built in memory (nothing is written)."""
    from t3.models.text_encoder import TextEncoder

    tokenizer = _tiny_tokenizer()
    return TextEncoder(
        _tiny_umt5(tokenizer, seed), tokenizer, source=f"tiny random text encoder (seed {seed})"
    )


def save_tiny_text_encoder(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny umT5 encoder and its tokenizer into folder ``path``.

    The folder loads with ``AutoTokenizer.from_pretrained(path, local_files_only=True)``,
    ``UMT5EncoderModel.from_pretrained(path, local_files_only=True)`` and
    :func:`t3.models.load_text_encoder`.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _tiny_tokenizer()
    _tiny_umt5(tokenizer, seed).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return give_umask_mode(path)


def save_tiny_dit(path: str | Path, format: Literal["diffusers", "wan"] = "diffusers", seed: int = 0) -> Path:
    """Save :func:`tiny_dit` to ``path`` in ``format`` (see :func:`t3.models.save_dit`).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    from t3.models.dit import save_dit

    return save_dit(tiny_dit(seed), path, format=format, preset="tiny")


def save_tiny_vae(path: str | Path, seed: int = 0) -> Path:
    """Save :func:`tiny_vae` as a diffusers folder at ``path`` (loadable with :func:`t3.models.load_vae`).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    tiny_vae(seed).save_pretrained(path, safe_serialization=True)
    return give_umask_mode(path)

"""The model's VAE and text encoder for encoding videos and prompts during a run, loaded once per process.

Training reads them in three places: the synthetic data source and the raw-video preparation encode
with them (`t3.data.factories`), and the sample-video callback decodes with the VAE and embeds its
prompts. They share one copy (umT5-XXL alone is 11 GB). The ``tiny`` preset has no folders to load
from: it gets `t3.models.tiny`'s random stand-ins, the text encoder written once to the cache folder.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["vae_and_text_encoder"]

_ENCODERS: dict[tuple[Any, ...], tuple[Any, Any]] = {}


def vae_and_text_encoder(model: Mapping[str, Any], cache_dir: str | os.PathLike) -> tuple[Any, Any]:
    """The model's VAE and text encoder from local paths, or tiny random ones for the ``tiny`` preset.

    Loaded once per process: the training and validation sets share them (umT5-XXL alone is 11 GB).

    Args:
        model: The ``model`` config (``preset``, ``vae_path``, ``text_encoder_path``).
        cache_dir: Where the tiny preset's text encoder is written (``<cache_dir>/tiny_text_encoder``).
    """
    key = (model.get("preset"), model.get("vae_path"), model.get("text_encoder_path"), str(cache_dir))
    if key not in _ENCODERS:
        _ENCODERS[key] = _load_vae_and_text_encoder(model, cache_dir)
    return _ENCODERS[key]


def _load_vae_and_text_encoder(model: Mapping[str, Any], cache_dir: str | os.PathLike) -> tuple[Any, Any]:
    from t3.models import load_text_encoder, load_vae

    vae_path, text_path = model.get("vae_path"), model.get("text_encoder_path")
    if vae_path and text_path:
        return load_vae(vae_path), load_text_encoder(text_path)
    if model.get("preset") != "tiny":
        raise ValueError(
            f"data=synthetic encodes videos, so it needs model.vae_path and model.text_encoder_path "
            f"for preset {model.get('preset')!r} (got {vae_path!r} and {text_path!r})"
        )
    from t3.models.tiny import tiny_vae

    return tiny_vae(), load_text_encoder(_tiny_text_encoder_folder(Path(cache_dir) / "tiny_text_encoder"))


def _tiny_tokenizer_ready(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def _tiny_text_encoder_folder(folder: Path, timeout_s: float = 300.0) -> Path:
    """Write the tiny text encoder once (rank 0) and let the other ranks wait for it.

    transformers' ``save_pretrained`` silently writes nothing on ranks other than 0 once torch.distributed
    is initialised, so rank 0 writes it (to a private folder, renamed into place when complete) and the
    others wait for the complete folder. No collective, so it is safe to call on rank 0 alone.
    """
    import shutil
    import time

    import torch.distributed as dist

    from t3.models.tiny import save_tiny_text_encoder

    if _tiny_tokenizer_ready(folder):
        return folder
    rank = (
        dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", 0))
    )
    if rank == 0:
        tmp = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:8]}")
        save_tiny_text_encoder(tmp)
        try:
            os.replace(tmp, folder)
        except OSError:  # another job wrote it meanwhile; its folder is identical
            shutil.rmtree(tmp, ignore_errors=True)
        return folder
    deadline = time.monotonic() + timeout_s
    while not _tiny_tokenizer_ready(folder):
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank}: rank 0 did not write the tiny text encoder to {folder}")
        time.sleep(0.2)
    return folder

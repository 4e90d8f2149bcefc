"""The umT5 text encoder and a prompt-embedding cache.

:meth:`TextEncoder.encode` reproduces ``WanPipeline._get_t5_prompt_embeds``: clean the prompt (ftfy, HTML
unescape, collapse whitespace), tokenize to ``max_length`` with padding and truncation, run the encoder with
the attention mask, and zero every position past a prompt's own length. The DiT was trained on exactly these
zero-padded embeddings, so any deviation would be a silent train/test mismatch.

Encoding with umT5-XXL is slow and its weights are large, while a training set repeats prompts constantly;
:class:`PromptEmbeddingCache` makes sure each prompt is encoded once, ever (in memory, and optionally on disk).
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from t3.io import atomic_path, give_umask_mode

try:
    import ftfy
except ImportError:  # a declared dependency; without it diffusers skips this step too
    ftfy = None

__all__ = ["PromptEmbeddingCache", "TextEncoder", "clean_prompt", "load_text_encoder"]

logger = logging.getLogger(__name__)

_EXPECTED = "expected a folder with a UMT5 config.json, model weights and a tokenizer"


def clean_prompt(text: str) -> str:
    """The prompt normalisation of the Wan pipelines: fix mojibake, unescape HTML, collapse whitespace."""
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class TextEncoder:
    """A umT5 encoder with its tokenizer.

    Attributes:
        model: The ``transformers.UMT5EncoderModel``.
        tokenizer: The matching tokenizer.
        source: Where it was loaded from (informational).
    """

    def __init__(self, model: torch.nn.Module, tokenizer, source: str = "") -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.source = source
        self._identity: str | None = None

    @property
    def dim(self) -> int:
        """Hidden size of the embeddings."""
        return self.model.config.d_model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TextEncoder:
        """Move/cast the encoder in place; returns ``self``."""
        self.model.to(device=device, dtype=dtype)
        self._identity = None  # the dtype is part of the identity
        return self

    @property
    def identity(self) -> str:
        """A fingerprint of what determines the embeddings: config, tokenizer, a sample of weights, dtype.

        Two encoders with the same identity produce the same embeddings, so it keys the embedding cache.
        It does not depend on the path, so a copied model folder keeps its cache.
        """
        if self._identity is None:
            config = self.model.config.to_dict()
            config.pop("_name_or_path", None)
            config.pop("transformers_version", None)
            config.pop("dtype", None)
            config.pop("torch_dtype", None)
            digest = hashlib.sha256()
            digest.update(json.dumps(config, sort_keys=True, default=str).encode())
            digest.update(f"{type(self.tokenizer).__name__}|{len(self.tokenizer)}|{self.dtype}".encode())
            # A strided sample of every tensor stands in for the weights: it catches any re-training or
            # different checkpoint while staying cheap for umT5-XXL (whose embedding alone has 1e9 entries).
            for name, tensor in sorted(self.model.state_dict().items()):
                flat = tensor.detach().reshape(-1)
                sample = flat[:: max(1, flat.numel() // 1024)][:1024]
                digest.update(name.encode())
                digest.update(sample.float().cpu().numpy().tobytes())
            self._identity = digest.hexdigest()[:16]
        return self._identity

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], max_length: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed prompts exactly like ``WanPipeline._get_t5_prompt_embeds``.

        Args:
            prompts: Prompt strings (a single ``str`` is treated as one prompt).
            max_length: Tokens per prompt after padding/truncation (512 for Wan).

        Returns:
            ``(embeddings, mask)``: embeddings ``[B, max_length, dim]`` in the encoder's dtype and device, zero
            at every padded position; mask ``[B, max_length]`` bool, True on the prompt's tokens.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        tokens = self.tokenizer(
            [clean_prompt(p) for p in prompts],
            padding="max_length",
            max_length=max_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        hidden = self.model(ids, mask).last_hidden_state
        mask = mask.bool()
        # The encoder output past the prompt is not zero; the pipeline zeroes it, so do we.
        return hidden.masked_fill(~mask.unsqueeze(-1), 0), mask


def load_text_encoder(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    tokenizer_path: str | os.PathLike | None = None,
) -> TextEncoder:
    """Load a umT5 encoder and its tokenizer from local folders (never downloads).

    Args:
        path: Folder with the encoder (``config.json`` + weights) and, unless ``tokenizer_path`` is given, the
            tokenizer. A diffusers pipeline folder (``text_encoder/`` + ``tokenizer/``) works too.
        dtype: Parameter dtype; None keeps the stored one.
        tokenizer_path: Separate tokenizer folder.

    Raises:
        FileNotFoundError: If the encoder or tokenizer folder is missing or has no ``config.json``.
    """
    from transformers import AutoTokenizer, UMT5EncoderModel

    path = Path(path)
    if tokenizer_path is None and (path / "text_encoder").is_dir() and (path / "tokenizer").is_dir():
        path, tokenizer_path = path / "text_encoder", path / "tokenizer"
    tokenizer_path = Path(tokenizer_path) if tokenizer_path is not None else path
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"text encoder not found: {path} ({_EXPECTED})")
    if not tokenizer_path.is_dir():
        raise FileNotFoundError(f"tokenizer not found: {tokenizer_path} ({_EXPECTED})")
    model = UMT5EncoderModel.from_pretrained(path, local_files_only=True, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True)
    logger.info("Loaded text encoder from %s (d_model=%d)", path, model.config.d_model)
    return TextEncoder(model, tokenizer, source=str(path))


class PromptEmbeddingCache:
    """Prompt -> embedding cache in memory and, optionally, on disk; a prompt is encoded at most once.

    Entries are keyed by ``sha256(encoder identity, max_length, prompt text)``, so a different encoder (or
    dtype) never reads another's embeddings. Only the prompt's own tokens are stored (``[n, dim]``); the
    zero padding is rebuilt on read. On disk each entry is ``<cache_dir>/<key[:2]>/<key>.safetensors``,
    written to a temporary name and renamed, so concurrent workers and interruptions are safe.

    Args:
        encoder: The text encoder. May be None if ``identity`` is given and every prompt is already cached
            on disk (e.g. training from a precomputed cache without loading umT5).
        cache_dir: Folder for the on-disk cache; None for memory only.
        max_length: Padded length of the returned embeddings.
        identity: Encoder identity to key entries with; defaults to ``encoder.identity``.
        batch_size: Prompts per encoder call when encoding misses.

    Attributes:
        hits: Prompts served from memory or disk.
        misses: Prompts that had to be encoded.
        encoder_calls: Number of ``encoder.encode`` calls made.
    """

    def __init__(
        self,
        encoder: TextEncoder | None,
        cache_dir: str | os.PathLike | None = None,
        *,
        max_length: int = 512,
        identity: str | None = None,
        batch_size: int = 16,
    ) -> None:
        if encoder is None and identity is None:
            raise ValueError("PromptEmbeddingCache needs an encoder or an explicit identity")
        self.encoder = encoder
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.max_length = max_length
        self.identity = identity if identity is not None else encoder.identity
        self.batch_size = batch_size
        self._memory: dict[str, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0
        self.encoder_calls = 0

    def key(self, prompt: str) -> str:
        """The cache key of ``prompt``."""
        text = f"{self.identity}\0{self.max_length}\0{prompt}"
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def __len__(self) -> int:
        return len(self._memory)

    def __contains__(self, prompt: str) -> bool:
        key = self.key(prompt)
        file = self._file(key)
        return key in self._memory or (file is not None and file.is_file())

    def get(
        self, prompts: Sequence[str], device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings of ``prompts``, encoding only those never seen before.

        Returns:
            ``(embeddings, mask)`` as from :meth:`TextEncoder.encode`: ``[B, max_length, dim]`` zero-padded,
            and a ``[B, max_length]`` bool mask. On ``device`` (default CPU).
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        keys = [self.key(p) for p in prompts]
        todo: dict[str, str] = {}  # key -> prompt, deduplicated, in first-seen order
        for key, prompt in zip(keys, prompts, strict=True):
            if key in self._memory or key in todo:
                continue
            loaded = self._load(key)
            if loaded is not None:
                self._memory[key] = loaded
            else:
                todo[key] = prompt
        self.misses += len(todo)
        self.hits += len(prompts) - len(todo)
        if todo:
            self._encode(todo)

        embeds = [self._memory[k] for k in keys]
        dim, dtype = embeds[0].shape[1], embeds[0].dtype
        out = torch.zeros(len(embeds), self.max_length, dim, dtype=dtype)
        mask = torch.zeros(len(embeds), self.max_length, dtype=torch.bool)
        for i, embed in enumerate(embeds):
            out[i, : len(embed)] = embed
            mask[i, : len(embed)] = True
        return out.to(device or "cpu"), mask.to(device or "cpu")

    __call__ = get

    def _encode(self, todo: dict[str, str]) -> None:
        if self.encoder is None:
            raise KeyError(f"{len(todo)} prompt(s) not in the cache and no encoder to compute them")
        items = list(todo.items())
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            embeds, mask = self.encoder.encode([p for _, p in chunk], max_length=self.max_length)
            self.encoder_calls += 1
            for (key, prompt), embed, m in zip(chunk, embeds, mask, strict=True):
                trimmed = embed[: int(m.sum())].detach().cpu().clone()  # clone: drop the batch storage
                self._memory[key] = trimmed
                self._store(key, prompt, trimmed)

    def _file(self, key: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / key[:2] / f"{key}.safetensors"

    def _load(self, key: str) -> torch.Tensor | None:
        file = self._file(key)
        if file is None or not file.is_file():
            return None
        with safe_open(file, framework="pt") as f:
            return f.get_tensor("embedding")

    def _store(self, key: str, prompt: str, embed: torch.Tensor) -> None:
        file = self._file(key)
        if file is None:
            return
        metadata = {"prompt": prompt, "identity": self.identity, "max_length": str(self.max_length)}
        with atomic_path(file) as tmp:
            save_file({"embedding": embed.contiguous()}, tmp, metadata=metadata)
            give_umask_mode(tmp)  # a cache shared between runs (and users); safetensors writes owner-only

"""umT5 text encoder wrapper (WanPipeline semantics) and the prompt-embedding cache."""

from __future__ import annotations

import types

import pytest
import torch

from t3.models import PromptEmbeddingCache, clean_prompt, load_text_encoder
from t3.models.tiny import TINY_TEXT_DIM, save_tiny_text_encoder

PROMPTS = ["a red cat in the city", "  A dog\n\non a  blue video &amp; more  ", ""]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_text_encoder(tmp_path_factory.mktemp("te") / "umt5")


@pytest.fixture(scope="module")
def encoder(folder):
    return load_text_encoder(folder)


def _counting(encoder):
    """Wrap ``encoder.encode`` so tests can count how often it runs."""
    calls = []
    original = encoder.encode

    def encode(prompts, max_length=512):
        calls.append(list(prompts))
        return original(prompts, max_length=max_length)

    encoder.encode = encode
    return calls


def test_encode_shape_and_zero_padding(encoder):
    embeds, mask = encoder.encode(PROMPTS)
    assert embeds.shape == (3, 512, TINY_TEXT_DIM) and mask.shape == (3, 512) and mask.dtype == torch.bool
    lengths = mask.sum(1)
    assert lengths[2] == 1  # an empty prompt is just </s>
    for i, n in enumerate(lengths.tolist()):
        assert mask[i, :n].all() and not mask[i, n:].any()  # right padding
        assert (embeds[i, n:] == 0).all()
        assert (embeds[i, :n].abs().sum(-1) > 0).all()
    short, _ = encoder.encode(PROMPTS[:1], max_length=16)
    torch.testing.assert_close(short[0], embeds[0, :16])


def test_encode_matches_wan_pipeline(encoder):
    from diffusers.pipelines.wan.pipeline_wan import WanPipeline, prompt_clean

    for p in PROMPTS + ["caf\u00c3\u00a9 &lt;b&gt;"]:
        assert clean_prompt(p) == prompt_clean(p)
    stub = types.SimpleNamespace(tokenizer=encoder.tokenizer, text_encoder=encoder.model)
    expected = WanPipeline._get_t5_prompt_embeds(
        stub, PROMPTS, max_sequence_length=64, device=torch.device("cpu"), dtype=torch.float32
    )
    got, _ = encoder.encode(PROMPTS, max_length=64)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_load_errors_and_identity(folder, encoder, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"text encoder not found: {tmp_path / 'nope'} .*UMT5"):
        load_text_encoder(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="tokenizer not found"):
        load_text_encoder(folder, tokenizer_path=tmp_path / "nope")

    again = load_text_encoder(folder)
    assert again.identity == encoder.identity  # stable across loads
    other = load_text_encoder(save_tiny_text_encoder(tmp_path / "other", seed=1))
    assert other.identity != encoder.identity  # different weights
    assert again.to(dtype=torch.bfloat16).identity != encoder.identity  # different output dtype


def test_memory_cache_never_encodes_twice(folder):
    encoder = load_text_encoder(folder)
    calls = _counting(encoder)
    cache = PromptEmbeddingCache(encoder, max_length=32)

    embeds, mask = cache.get(["a cat", "a dog", "a cat"])
    assert calls == [["a cat", "a dog"]]  # the duplicate is encoded once, in a single batch
    assert (cache.misses, cache.hits, cache.encoder_calls, len(cache)) == (2, 1, 1, 2)
    direct, direct_mask = encoder.encode(["a cat", "a dog", "a cat"], max_length=32)
    torch.testing.assert_close(embeds, direct)
    assert torch.equal(mask, direct_mask)

    cache.get(["a dog"])
    cache("a cat")
    assert len(calls) == 2 and cache.encoder_calls == 1 and cache.hits == 3  # 1 extra call: `direct` above
    cache.get(["a dog", "new prompt"])
    assert calls[-1] == ["new prompt"] and cache.encoder_calls == 2
    assert "new prompt" in cache and "never seen" not in cache


def test_disk_cache(folder, tmp_path):
    encoder = load_text_encoder(folder)
    calls = _counting(encoder)
    first = PromptEmbeddingCache(encoder, tmp_path / "cache", max_length=24, batch_size=2)
    embeds, mask = first.get(PROMPTS)
    assert first.encoder_calls == 2  # 3 prompts, batches of 2
    files = sorted((tmp_path / "cache").rglob("*"))
    assert len([f for f in files if f.suffix == ".safetensors"]) == 3
    assert not [f for f in files if f.name.startswith(".")]  # atomic writes leave no temporaries

    # A fresh process (new cache object) reads from disk: no encoding at all.
    second = PromptEmbeddingCache(encoder, tmp_path / "cache", max_length=24)
    again, again_mask = second.get(PROMPTS[::-1])
    assert second.encoder_calls == 0 and second.hits == 3 and len(calls) == 2
    assert torch.equal(again, embeds.flip(0)) and torch.equal(again_mask, mask.flip(0))

    # Training from a precomputed cache needs no encoder, only its identity.
    offline = PromptEmbeddingCache(None, tmp_path / "cache", max_length=24, identity=encoder.identity)
    assert torch.equal(offline.get(PROMPTS[:1])[0], embeds[:1])
    with pytest.raises(KeyError, match="no encoder"):
        offline.get(["never seen"])

    # Another max_length (or encoder) is a different entry.
    longer = PromptEmbeddingCache(encoder, tmp_path / "cache", max_length=48)
    longer.get(PROMPTS[:1])
    assert longer.encoder_calls == 1

"""Latent shards: schema round trip, bad data skipped and counted, shuffling, splitting and bucketing."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import webdataset as wds
from safetensors.torch import save as save_safetensors

from t3.data.shards import (
    SampleError,
    build_latent_dataset,
    decode_sample,
    encode_sample,
    list_shards,
    write_shards,
)
from t3.data.skips import SkipCounter

TEXT_DIM = 16


def _sample(i: int, shape: tuple[int, ...] = (4, 2, 4, 4)) -> dict:
    g = torch.Generator().manual_seed(i)
    tokens = 3 + i % 7
    text = torch.zeros(512, TEXT_DIM)
    text[:tokens] = torch.randn(tokens, TEXT_DIM, generator=g)
    return {
        "__key__": f"{i:06d}",
        "latents": torch.randn(shape, generator=g),
        "text": text,
        "text_mask": torch.arange(512) < tokens,
        "caption": f"a red circle number {i}",
        "meta": {"source": f"video_{i}.mp4", "fps": 16.0, "num_frames": 5, "height": 32, "width": 32},
    }


def _keys(dataset) -> list[str]:
    return [s["__key__"] for s in dataset]


def test_round_trip_restores_padding_and_metadata(tmp_path: Path):
    samples = [_sample(i) for i in range(7)]
    shards = write_shards(samples, tmp_path, maxcount=3)
    assert [p.name for p in shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert list_shards(tmp_path) == [str(p) for p in shards]

    dataset = build_latent_dataset(tmp_path, shuffle_shards=False)
    out = list(dataset)
    assert [s["__key__"] for s in out] == [s["__key__"] for s in samples]
    for got, want in zip(out, samples, strict=True):
        assert torch.equal(got["latents"], want["latents"])
        assert torch.equal(got["text"], want["text"])
        assert torch.equal(got["text_mask"], want["text_mask"])
        assert got["caption"] == want["caption"]
        assert got["meta"]["source"] == want["meta"]["source"]
        assert got["meta"]["latent_shape"] == [4, 2, 4, 4]
    assert dataset.skips.total == 0


def _raw(sample: dict) -> dict:
    return encode_sample(
        sample["__key__"],
        latents=sample["latents"],
        text=sample["text"],
        text_mask=sample["text_mask"],
        caption=sample["caption"],
        meta=sample["meta"],
    )


def _write_raw(path: Path, raws: list[dict]) -> None:
    # encoder=False: members are written byte for byte, broken ones included.
    with wds.TarWriter(str(path), encoder=False) as tar:
        for raw in raws:
            tar.write({k: v.encode() if isinstance(v, str) and k != "__key__" else v for k, v in raw.items()})


def _broken_shard(path: Path) -> tuple[list[str], dict[str, int]]:
    """40 samples, 6 of them broken in different ways; returns the good keys and the expected counts."""
    raws, good = [], []
    for i in range(40):
        raw = _raw(_sample(i))
        if i == 3:  # truncated member bytes
            raw["latents.safetensors"] = raw["latents.safetensors"][:-37]
        elif i == 9:  # missing caption
            del raw["caption.txt"]
        elif i == 14:  # wrong latent rank
            raw["latents.safetensors"] = save_safetensors({"latents": torch.zeros(4, 4, 4)})
        elif i == 21:  # garbage json
            raw["json"] = b"{not json\xff"
        elif i == 27:  # text dim mismatch
            raw["text.safetensors"] = encode_sample(
                "x", latents=torch.zeros(1, 1, 1, 1), text=torch.zeros(5, TEXT_DIM + 1), caption="x"
            )["text.safetensors"]
        elif i == 33:  # NaN latents
            bad = _sample(i)
            bad["latents"][0, 0, 0, 0] = float("nan")
            raw = _raw(bad)
        else:
            good.append(raw["__key__"])
        raws.append(raw)
    _write_raw(path, raws)
    return good, {"decode_error": 2, "missing_field": 1, "bad_shape": 2, "non_finite": 1}


def test_broken_samples_are_skipped_counted_and_logged(tmp_path: Path, caplog):
    good, expected = _broken_shard(tmp_path / "shard-000000.tar")
    dataset = build_latent_dataset(tmp_path, text_dim=TEXT_DIM, latent_channels=4)
    with caplog.at_level(logging.WARNING, logger="t3.data.skips"):
        keys = _keys(dataset)
    assert keys == good
    assert dict(dataset.skips.counts) == expected
    assert "shard-000000.tar:000003" in dataset.skips.examples["decode_error"][0]
    assert "shard-000000.tar:000009" in caplog.text  # each skip is logged with shard and key
    assert "6 skipped" in caplog.text  # and summarised at the end of the epoch


def test_truncated_and_missing_shards_do_not_stop_the_run(tmp_path: Path):
    write_shards([_sample(i) for i in range(10)], tmp_path, maxcount=5)
    second = tmp_path / "shard-000001.tar"
    data = second.read_bytes()
    second.write_bytes(data[: len(data) // 2])  # cut in the middle of a member
    urls = [str(tmp_path / "shard-000000.tar"), str(second), str(tmp_path / "missing.tar")]

    dataset = build_latent_dataset(urls, shuffle_shards=False, text_dim=TEXT_DIM)
    keys = _keys(dataset)
    assert keys[:5] == [f"{i:06d}" for i in range(5)]  # the intact shard in full
    assert 5 <= len(keys) < 10 and len(set(keys)) == len(keys)
    assert dataset.skips.counts["read_error"] >= 2  # truncated shard and missing shard
    assert any("missing.tar" in e for e in dataset.skips.examples["read_error"])


def test_text_dim_is_learnt_from_the_first_good_sample_without_manifest(tmp_path: Path):
    samples = [_sample(i) for i in range(4)]
    odd = dict(_sample(4), text=torch.zeros(512, 8))
    write_shards([*samples, odd], tmp_path)
    dataset = build_latent_dataset(tmp_path)
    assert _keys(dataset) == [s["__key__"] for s in samples]
    assert dataset.skips.counts == {"bad_shape": 1}


def test_manifest_supplies_the_expected_dims(tmp_path: Path):
    write_shards([_sample(0)], tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"text_dim": 99, "latent_channels": 4}))
    dataset = build_latent_dataset(tmp_path)
    assert _keys(dataset) == []
    assert dataset.skips.counts == {"bad_shape": 1}


def test_shuffling_is_deterministic_per_seed_and_epoch(tmp_path: Path):
    write_shards([_sample(i) for i in range(24)], tmp_path, maxcount=4)

    def order(seed: int, epoch: int = 0) -> list[str]:
        dataset = build_latent_dataset(tmp_path, seed=seed, shuffle_buffer=8)
        dataset.set_epoch(epoch)
        return _keys(dataset)

    base = order(0)
    assert sorted(base) == [f"{i:06d}" for i in range(24)]
    assert base != sorted(base)
    assert order(0) == base
    assert order(1) != base
    assert order(0, epoch=1) != base
    assert order(0, epoch=1) == order(0, epoch=1)


def test_ranks_see_disjoint_shards(tmp_path: Path, monkeypatch):
    write_shards([_sample(i) for i in range(12)], tmp_path, maxcount=3)
    seen = []
    for rank in range(2):
        # webdataset reads RANK/WORLD_SIZE like torch.distributed launchers set them.
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        seen.append(set(_keys(build_latent_dataset(tmp_path, seed=3, shuffle_buffer=4))))
    assert seen[0].isdisjoint(seen[1])
    assert seen[0] | seen[1] == {f"{i:06d}" for i in range(12)}
    assert len(seen[0]) == len(seen[1]) == 6


def test_data_parallel_rank_overrides_the_process_rank(tmp_path: Path, monkeypatch):
    # 4 processes in SP groups of 2: ranks 0, 1 read stream 0 of 2, ranks 2, 3 stream 1 (t3.parallel).
    write_shards([_sample(i) for i in range(12)], tmp_path, maxcount=3)
    monkeypatch.setenv("WORLD_SIZE", "4")
    seen = []
    for rank in range(4):
        monkeypatch.setenv("RANK", str(rank))
        dataset = build_latent_dataset(tmp_path, seed=3, shuffle_buffer=4)
        dataset.set_data_parallel(rank // 2, 2)
        seen.append(_keys(dataset))
    assert seen[0] == seen[1] and seen[2] == seen[3]
    assert set(seen[0]).isdisjoint(seen[2]) and len(seen[0]) == len(seen[2]) == 6


def test_dataloader_workers_see_disjoint_shards(tmp_path: Path):
    write_shards([_sample(i) for i in range(16)], tmp_path, maxcount=4)
    dataset = build_latent_dataset(tmp_path, seed=0, batch_size=2)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
    keys = [k for batch in loader for k in batch["__key__"]]
    assert sorted(keys) == [f"{i:06d}" for i in range(16)]


def test_bucketed_batches_from_mixed_resolutions(tmp_path: Path):
    shapes = [(4, 2, 4, 4), (4, 2, 4, 6), (4, 3, 2, 4)]
    write_shards([_sample(i, shapes[i % 3]) for i in range(20)], tmp_path, maxcount=6)
    dataset = build_latent_dataset(tmp_path, seed=0, shuffle_buffer=5, batch_size=3)
    batches = list(dataset)
    assert sum(len(b["__key__"]) for b in batches) == 20
    for batch in batches:
        assert batch["latents"].shape[0] == batch["text"].shape[0] == len(batch["caption"])
        assert {int(k) % 3 for k in batch["__key__"]} == {shapes.index(tuple(batch["latents"].shape[1:]))}
    assert [b["__key__"] for b in build_latent_dataset(tmp_path, seed=0, shuffle_buffer=5, batch_size=3)] == [
        b["__key__"] for b in batches
    ]


def test_decode_sample_reasons():
    raw = _raw(_sample(0))
    assert decode_sample(raw, text_dim=TEXT_DIM)["text"].shape == (512, TEXT_DIM)
    with pytest.raises(SampleError) as err:
        decode_sample({**raw, "caption.txt": b"   "})
    assert err.value.reason == "missing_field"
    with pytest.raises(SampleError) as err:
        decode_sample(raw, latent_channels=16)
    assert err.value.reason == "bad_shape"
    with pytest.raises(ValueError, match="key"):
        encode_sample("a.b", latents=torch.zeros(1, 1, 1, 1), text=torch.zeros(1, 4), caption="x")


def test_skip_counter_as_webdataset_handler():
    counter = SkipCounter(max_examples=1)
    assert counter.handler(OSError("bad header", "/data/shard-000007.tar")) is True
    counter.add("bad_shape", "shard-000001.tar:000002", "latents 3-D")
    counter.add("bad_shape", "shard-000001.tar:000003", "latents 3-D")
    assert counter.counts == {"read_error": 1, "bad_shape": 2}
    assert counter.examples["read_error"] == ["shard-000007.tar: OSError: bad header"]
    assert len(counter.examples["bad_shape"]) == 1
    assert counter.summary() == "3 skipped (bad_shape=2, read_error=1)"


def test_samples_off_the_manifest_shape_are_skipped(tmp_path: Path):
    write_shards([_sample(0), _sample(1, shape=(4, 2, 4, 6)), _sample(2)], tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"latent_shape": [4, 2, 4, 4], "text_dim": TEXT_DIM}))
    dataset = build_latent_dataset(tmp_path, shuffle_shards=False)
    assert _keys(dataset) == ["000000", "000002"]
    assert dataset.skips.counts == {"bad_shape": 1}
    assert "[4, 2, 4, 6]" in dataset.skips.examples["bad_shape"][0]
    assert "manifest" in dataset.skips.examples["bad_shape"][0]


def test_samples_the_model_cannot_take_are_skipped(tmp_path: Path):
    # The tiny DiT's rotary embedding covers 32 positions per axis: 80x80 latents give a 40x40 token grid,
    # which would fail deep inside diffusers' RoPE.
    write_shards(
        [_sample(0, shape=(4, 5, 4, 4)), _sample(1, shape=(4, 5, 80, 80)), _sample(2, (4, 5, 4, 6))], tmp_path
    )
    dataset = build_latent_dataset(tmp_path, shuffle_shards=False, preset="tiny")
    assert _keys(dataset) == ["000000", "000002"]  # without a manifest or sizes, any shape the model takes
    assert dataset.skips.counts == {"bad_shape": 1}
    assert "rope_max_seq_len" in dataset.skips.examples["bad_shape"][0]


def test_allowed_sizes_select_the_resolution_buckets(tmp_path: Path):
    shapes = [(4, 5, 4, 4), (4, 5, 4, 6), (4, 5, 6, 6)]
    write_shards([_sample(i, shapes[i % 3]) for i in range(6)], tmp_path)
    # 17 frames x 32 x 32 and x 48 pixels on the tiny model: latents [4, 5, 4, 4] and [4, 5, 4, 6].
    dataset = build_latent_dataset(
        tmp_path, shuffle_shards=False, preset="tiny", sizes=[[17, 32, 32], [17, 32, 48]]
    )
    assert _keys(dataset) == ["000000", "000001", "000003", "000004"]
    assert dataset.skips.counts == {"bad_shape": 2}
    with pytest.raises(ValueError, match="preset"):
        build_latent_dataset(tmp_path, sizes=[[17, 32, 32]])

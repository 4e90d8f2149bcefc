"""Synthetic moving-shape videos: deterministic, captions match the pixels, encoded samples match the schema."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from t3.data import build_latent_dataset, decode_sample, encode_sample, write_shards
from t3.data.synthetic import (
    COLOURS,
    DIRECTIONS,
    SyntheticLatentDataset,
    SyntheticVideoDataset,
    synthetic_spec,
    synthetic_video,
)


def test_same_index_and_seed_give_the_identical_video():
    a, caption_a = synthetic_video(5, frames=9, height=32, width=48, seed=1)
    b, caption_b = synthetic_video(5, frames=9, height=32, width=48, seed=1)
    assert a.shape == (9, 32, 48, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and caption_a == caption_b
    assert not np.array_equal(a, synthetic_video(5, frames=9, height=32, width=48, seed=2)[0])
    captions = {synthetic_video(i, frames=1, height=8, width=8)[1] for i in range(20)}
    assert len(captions) > 10  # varied content


@pytest.mark.parametrize("index", range(8))
def test_caption_describes_the_pixels(index: int):
    video, caption = synthetic_video(index, frames=9, height=64, width=64)
    spec = synthetic_spec(index)
    assert caption.split()[1:3] == [spec["colour"], spec["shape"]]
    assert caption.endswith(
        f"moving {spec['direction']} on a {spec['background']}"
        + (" gradient" if spec["gradient"] else "")
        + " background"
    )
    # The object is the set of pixels of its exact colour; its centroid moves in the named direction.
    colour = np.array(COLOURS[spec["colour"]])
    centroids = []
    for frame in (video[0], video[-1]):
        ys, xs = np.nonzero((frame.astype(int) == colour).all(-1))
        assert len(xs) > 20
        centroids.append((xs.mean(), ys.mean()))
    motion = np.subtract(centroids[1], centroids[0])
    dx, dy = DIRECTIONS[spec["direction"]]
    assert motion @ np.array([dx, dy]) > 0.25 * 64 * spec["speed"]  # moved along the direction


def test_video_dataset_items():
    dataset = SyntheticVideoDataset(3, frames=5, height=16, width=32, seed=0)
    item = dataset[2]
    assert len(dataset) == 3
    assert item["video"].shape == (3, 5, 16, 32) and item["video"].dtype == torch.float32
    assert -1 <= item["video"].min() and item["video"].max() <= 1
    assert item["caption"] == synthetic_video(2, frames=5, height=16, width=32)[1]
    with pytest.raises(IndexError):
        dataset[3]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from t3.models import load_text_encoder
    from t3.models.tiny import save_tiny_text_encoder, tiny_vae

    folder = tmp_path_factory.mktemp("models")
    return tiny_vae(), load_text_encoder(save_tiny_text_encoder(folder / "text_encoder"))


def test_latent_samples_follow_the_shard_schema_and_are_encoded_once(tiny_models, tmp_path: Path):
    vae, encoder = tiny_models
    kwargs = dict(vae=vae, text_encoder=encoder, frames=5, height=32, width=32, seed=0, cache_dir=tmp_path)
    dataset = SyntheticLatentDataset(3, **kwargs)
    sample = dataset[1]
    assert sample["latents"].shape == (4, 2, 4, 4)
    assert sample["text"].shape == (512, 16) and sample["text_mask"].shape == (512,)
    assert sample["text"][~sample["text_mask"]].abs().sum() == 0  # zero padding like the Wan pipeline
    assert sample["caption"] == synthetic_video(1, frames=5, height=32, width=32)[1]
    assert sample["meta"]["num_frames"] == 5

    assert torch.equal(dataset[1]["latents"], sample["latents"]) and dataset.encoded == 1  # memory cache
    again = SyntheticLatentDataset(3, **kwargs)
    assert torch.equal(again[1]["text"], sample["text"]) and again.encoded == 0  # disk cache
    assert torch.equal(again[1]["latents"], sample["latents"])

    # The same samples through a shard and the reader come back identical.
    raw = encode_sample(
        sample["__key__"],
        latents=sample["latents"],
        text=sample["text"],
        text_mask=sample["text_mask"],
        caption=sample["caption"],
        meta=sample["meta"],
    )
    assert torch.equal(decode_sample(raw)["text"], sample["text"])
    write_shards(dataset, tmp_path / "shards")
    read = list(build_latent_dataset(tmp_path / "shards", shuffle_shards=False))
    assert [s["__key__"] for s in read] == ["000000000", "000000001", "000000002"]
    assert torch.equal(read[1]["latents"], sample["latents"])
    assert set(read[1]) >= set(sample)

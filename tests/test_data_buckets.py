"""Resolution buckets: one latent shape per batch, leftovers flushed, deterministic."""

from __future__ import annotations

import pytest
import torch

from t3.data.buckets import BucketBatcher, collate_samples, consecutive_batches


def _sample(i: int, shape: tuple[int, ...]) -> dict:
    return {
        "__key__": f"{i:04d}",
        "latents": torch.full(shape, float(i)),
        "text": torch.zeros(8, 4),
        "text_mask": torch.ones(8, dtype=torch.bool),
        "caption": f"caption {i}",
        "meta": {"i": i},
    }


SHAPES = [(4, 2, 4, 4), (4, 2, 4, 6), (4, 3, 4, 4)]


def _stream(n: int = 20) -> list[dict]:
    return [_sample(i, SHAPES[(i * 7) % 5 % 3]) for i in range(n)]


def test_every_batch_holds_one_shape_and_all_samples_come_out_once():
    batches = list(BucketBatcher(3)(_stream()))
    keys = [k for b in batches for k in b["__key__"]]
    assert sorted(keys) == sorted(s["__key__"] for s in _stream())
    for batch in batches:
        assert batch["latents"].ndim == 5
        assert len(batch["caption"]) == len(batch["__key__"]) == batch["latents"].shape[0] <= 3
        # Sample i is filled with i: the batch really stacks its own samples.
        for j, key in enumerate(batch["__key__"]):
            assert batch["latents"][j].flatten()[0].item() == int(key)


def test_full_buckets_are_emitted_as_soon_as_they_fill_and_leftovers_at_the_end():
    stream = [_sample(0, SHAPES[0]), _sample(1, SHAPES[1]), _sample(2, SHAPES[0]), _sample(3, SHAPES[1])]
    stream += [_sample(4, SHAPES[2])]
    batcher = BucketBatcher(2)
    batches = [b["__key__"] for b in batcher(stream)]
    assert batches == [["0000", "0002"], ["0001", "0003"], ["0004"]]
    assert batcher.batches_per_bucket == {SHAPES[0]: 1, SHAPES[1]: 1, SHAPES[2]: 1}


def test_drop_last_drops_partial_buckets():
    batcher = BucketBatcher(3, drop_last=True)
    batches = list(batcher(_stream()))
    assert all(len(b["__key__"]) == 3 for b in batches)
    assert batcher.dropped + 3 * len(batches) == 20


def test_batches_are_deterministic():
    first = [b["__key__"] for b in BucketBatcher(3)(_stream())]
    second = [b["__key__"] for b in BucketBatcher(3)(iter(_stream()))]
    assert first == second


def test_consecutive_batches_reject_mixed_shapes_with_a_clear_error():
    same = [_sample(i, SHAPES[0]) for i in range(5)]
    assert [len(b["__key__"]) for b in consecutive_batches(same, 2)] == [2, 2, 1]
    assert [len(b["__key__"]) for b in consecutive_batches(same, 2, drop_last=True)] == [2, 2]
    with pytest.raises(ValueError, match="latents shapes differ"):
        list(consecutive_batches(_stream(), 4))


def test_collate_layout():
    batch = collate_samples([_sample(0, SHAPES[0]), _sample(1, SHAPES[0])])
    assert batch["latents"].shape == (2, *SHAPES[0])
    assert batch["text"].shape == (2, 8, 4)
    assert batch["text_mask"].dtype == torch.bool
    assert batch["meta"] == [{"i": 0}, {"i": 1}]
    with pytest.raises(ValueError):
        BucketBatcher(0)

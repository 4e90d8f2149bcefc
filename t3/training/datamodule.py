"""Training data for `T3FinetuneModule`: resumable, rank-aware loaders around the `t3.data` readers.

The readers themselves live in `t3.data`; the ``data/`` config group builds them with the factories of
`t3.data.factories` (Hydra ``_target_``s). This module adds what training needs on top:

* **Data order is a function of the optimizer step.** Map-style datasets are read through `StepSampler`:
  step ``s`` uses global stream positions ``[s * G, (s + 1) * G)`` (``G`` = global batch) of a seeded
  per-epoch permutation, split into contiguous per-rank slices. The loader asks the trainer for its
  global step when iteration starts, so a resumed run continues with exactly the batches the interrupted
  run would have seen, without reading the skipped ones. Streaming (iterable) readers are resumed by
  skipping the batches this rank already consumed (``global_step * accumulate``), which re-reads them.
* **Every sample carries its stream position** (``batch["position"]``). The module seeds each sample's
  noise and noise level from it, so the loss of a global batch does not depend on how it is split over
  GPUs and micro-batches: one process with accumulation and N processes see the same numbers.
* Validation uses the first ``num_batches`` batches of the held-out set on every rank, always the same.
* **Ranks here are data-parallel ranks.** Under sequence parallelism the ``sp`` ranks of an SP group share
  one sample stream (they hold shards of the same videos), so samplers, streaming readers and validation
  slices split the data over ``(dp_rank, dp_size) = (rank // sp, world / sp)``
  (`t3.parallel.data_parallel_rank`); with ``sp = 1`` that is ``(rank, world)``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from t3.data import SKIPPED_KEY, collate_samples
from t3.parallel.groups import data_parallel_rank

__all__ = ["SkipTally", "StepSampler", "T3DataModule"]

logger = logging.getLogger(__name__)


# --- samplers and loaders ---------------------------------------------------------------------------------


class StepSampler(Sampler[list[tuple[int, int]]]):
    """Infinite batch sampler over a map-style dataset: this rank's micro-batches, from a given step on.

    Global stream position ``g`` maps to dataset index ``perm_e[g mod N]`` with ``e = g // N`` and
    ``perm_e`` a permutation seeded by ``(seed, e)``. Step ``s`` covers positions ``[s*G, (s+1)*G)``;
    rank ``r`` takes the contiguous slice ``[s*G + r*A*m, s*G + (r+1)*A*m)`` as ``A`` micro-batches of
    ``m``. Items are ``(position, index)`` pairs.

    Args:
        dataset_size: ``N``.
        micro_batch_size: ``m``.
        accumulate: ``A``, micro-batches per optimizer step.
        rank: This process's data-parallel rank.
        world_size: Data-parallel replicas.
        seed: Permutation seed.
        start_step: Called when iteration starts; returns the optimizer step to start from.
    """

    def __init__(
        self,
        dataset_size: int,
        *,
        micro_batch_size: int,
        accumulate: int,
        rank: int,
        world_size: int,
        seed: int,
        start_step: Callable[[], int] = lambda: 0,
    ) -> None:
        if dataset_size < 1:
            raise ValueError("StepSampler: empty dataset")
        self.size = dataset_size
        self.micro = micro_batch_size
        self.accumulate = accumulate
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.start_step = start_step
        self._perm: tuple[int, torch.Tensor] | None = None

    def index(self, position: int) -> int:
        """Dataset index at global stream position ``position``."""
        epoch, offset = divmod(position, self.size)
        if self._perm is None or self._perm[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.size, generator=generator))
        return int(self._perm[1][offset])

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        per_rank = self.micro * self.accumulate
        per_step = per_rank * self.world_size
        step = int(self.start_step())
        if step:
            logger.info("data: resuming the sample stream at step %d (position %d)", step, step * per_step)
        while True:
            base = step * per_step + self.rank * per_rank
            for m in range(self.accumulate):
                start = base + m * self.micro
                yield [(g, self.index(g)) for g in range(start, start + self.micro)]
            step += 1


class _Positioned(Dataset):
    """Map-style dataset indexed by ``(position, index)`` pairs; adds the position to the sample."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Any]:
        position, index = item
        return {**self.dataset[index], "position": position}


def collate_with_positions(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """`t3.data.collate_samples` plus the ``position`` of every sample as an int64 tensor ``[B]``."""
    batch = collate_samples(samples)
    batch["position"] = torch.tensor([s["position"] for s in samples], dtype=torch.int64)
    return batch


class SkipTally:
    """What this rank's training stream delivered: samples, and the items its readers skipped by reason.

    Counted in the main process from the ``__skipped__`` counts every reader item carries (`t3.data`), so
    it covers all dataloader workers; `t3.training.callbacks.DataSkipMonitor` sums it over the ranks.
    A resumed run re-reads the batches it fast-forwards over, so its counts continue where they stood.
    """

    def __init__(self) -> None:
        self.samples = 0
        self.skipped: Counter[str] = Counter()

    def add(self, skipped: Mapping[str, int] | None, samples: int = 0) -> None:
        self.samples += samples
        self.skipped.update(skipped or {})


class _Epochs(IterableDataset):
    """A streaming reader repeated over epochs (``set_epoch`` before each), forever.

    After each pass it yields the reader's skips not yet attached to a batch (bad samples after its last
    batch) as an item of their own, ``{"__skipped__": {...}}``, which `_StreamLoader` counts and drops.
    """

    def __init__(self, reader: IterableDataset) -> None:
        self.reader = reader

    def __iter__(self) -> Iterator[Any]:
        epoch = 0
        while True:
            if hasattr(self.reader, "set_epoch"):
                self.reader.set_epoch(epoch)
            count = 0
            for batch in self.reader:
                count += 1
                yield batch
            skips = getattr(self.reader, "skips", None)
            rest = skips.take_unreported() if skips is not None else {}
            if rest:
                yield {SKIPPED_KEY: rest}
            if count == 0:  # this worker has no shards: stop it, the others carry on
                return
            epoch += 1


class _StreamLoader:
    """Iterates a batched streaming reader for training: skips consumed batches, numbers the samples.

    Args:
        loader: ``DataLoader(_Epochs(reader), batch_size=None, ...)``.
        skip_batches: Called when iteration starts; batches this rank already trained on.
        rank: This process's data-parallel rank.
        world_size: Data-parallel replicas.
    """

    def __init__(
        self,
        loader: DataLoader,
        *,
        skip_batches: Callable[[], int],
        rank: int,
        world_size: int,
        tally: SkipTally | None = None,
    ) -> None:
        self.loader = loader
        self.skip_batches = skip_batches
        self.rank = rank
        self.world_size = world_size
        self.tally = tally if tally is not None else SkipTally()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        skip = int(self.skip_batches())
        if skip:
            logger.info("data: fast-forwarding the shard stream by %d batches on rank %d", skip, self.rank)
        sample = batches = 0
        for batch in self.loader:
            skipped = batch.pop(SKIPPED_KEY, None)
            if "latents" not in batch:  # a reader's skips at the end of a pass
                self.tally.add(skipped)
                continue
            size = len(batch["latents"])
            self.tally.add(skipped, size)
            if batches >= skip:
                # Unique across ranks: interleave the ranks' per-rank sample counters.
                local = torch.arange(sample, sample + size, dtype=torch.int64)
                batch["position"] = local * self.world_size + self.rank
                yield batch
            batches += 1
            sample += size
        # The stream repeats epochs forever; it only ends when this rank has no data at all, and a rank
        # without batches would leave the others waiting in their collectives.
        raise RuntimeError(
            f"rank {self.rank}: the training shards yield no batches (fewer shards than ranks x dataloader "
            "workers, or every sample was skipped: see the skip counts logged above)"
        )


# --- the data module --------------------------------------------------------------------------------------


class T3DataModule(L.LightningDataModule):
    """Training and validation loaders built from dataset factories.

    Args:
        train: Returns the training dataset: map-style samples, or an iterable of batches of
            ``micro_batch_size`` (the latent-shard reader).
        val: Returns the held-out dataset, or None; may itself be None.
        prepare: Run once on global rank 0 before the datasets are built (e.g. encode raw videos).
        micro_batch_size: Samples per forward per rank.
        accumulate: Micro-batches per optimizer step.
        seed: Data-order seed.
        num_workers: DataLoader workers per rank.
        val_num_batches: Validation batches per rank.
        sequence_parallel_size: Ranks sharing each sample (``parallel.sequence_parallel_size``).
    """

    def __init__(
        self,
        train: Callable[[], Dataset | IterableDataset],
        val: Callable[[], Dataset | IterableDataset | None] | None,
        *,
        micro_batch_size: int,
        accumulate: int,
        seed: int,
        num_workers: int = 0,
        val_num_batches: int = 4,
        prepare: Callable[[], Any] | None = None,
        sequence_parallel_size: int = 1,
    ) -> None:
        super().__init__()
        self.train_factory = train
        self.val_factory = val
        self.prepare_fn = prepare
        self.micro_batch_size = micro_batch_size
        self.accumulate = accumulate
        self.seed = seed
        self.num_workers = num_workers
        self.val_num_batches = val_num_batches
        self.sequence_parallel_size = sequence_parallel_size
        self.train_set: Dataset | IterableDataset | None = None
        self.val_set: Dataset | IterableDataset | None = None
        self.skip_tally = SkipTally()  # of the training stream on this rank
        # Preparing writes shared files: once per job (shared file system), not once per node.
        self.prepare_data_per_node = False

    def prepare_data(self) -> None:
        if self.prepare_fn is not None:
            self.prepare_fn()

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = self.train_factory()
        if self.val_set is None and self.val_factory is not None:
            self.val_set = self.val_factory()
            if self.val_set is None:
                logger.info("no held-out data (data.val.urls_or_dir is null): no validation loss")

    def _rank_world(self) -> tuple[int, int]:
        """This process's data-parallel ``(rank, size)``: the sample stream it reads (module docstring)."""
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return data_parallel_rank(trainer.global_rank, trainer.world_size, self.sequence_parallel_size)

    def _assign_stream(self, dataset: Dataset | IterableDataset, rank: int, world: int) -> None:
        # A streaming reader splits its shards by process rank unless told the data-parallel one.
        if hasattr(dataset, "set_data_parallel"):
            dataset.set_data_parallel(rank, world)

    def _global_step(self) -> int:
        return int(self.trainer.global_step) if self.trainer is not None else 0

    def _loader_kwargs(self) -> dict[str, Any]:
        workers = self.num_workers
        return {
            "num_workers": workers,
            "persistent_workers": False,
            "pin_memory": torch.cuda.is_available(),
            **({"prefetch_factor": 2} if workers > 0 else {}),
        }

    def train_dataloader(self) -> Any:
        assert self.train_set is not None, "setup() first"
        rank, world = self._rank_world()
        if isinstance(self.train_set, IterableDataset):
            self._assign_stream(self.train_set, rank, world)
            loader = DataLoader(_Epochs(self.train_set), batch_size=None, **self._loader_kwargs())
            return _StreamLoader(
                loader,
                skip_batches=lambda: self._global_step() * self.accumulate,
                rank=rank,
                world_size=world,
                tally=self.skip_tally,
            )
        sampler = StepSampler(
            len(self.train_set),  # type: ignore[arg-type]
            micro_batch_size=self.micro_batch_size,
            accumulate=self.accumulate,
            rank=rank,
            world_size=world,
            seed=self.seed,
            start_step=self._global_step,
        )
        return DataLoader(
            _Positioned(self.train_set),
            batch_sampler=sampler,
            collate_fn=collate_with_positions,
            **self._loader_kwargs(),
        )

    def val_dataloader(self) -> Any:
        if self.val_set is None:
            return []
        rank, world = self._rank_world()
        if isinstance(self.val_set, IterableDataset):
            self._assign_stream(self.val_set, rank, world)
            if hasattr(self.val_set, "set_epoch"):
                self.val_set.set_epoch(0)
            return _FirstBatches(
                DataLoader(self.val_set, batch_size=None, **self._loader_kwargs()),
                self.val_num_batches,
                rank,
                world,
            )
        size = len(self.val_set)  # type: ignore[arg-type]
        per_rank = self.val_num_batches * self.micro_batch_size
        # Contiguous, fixed slices per rank; the position is the dataset index, so the noise is fixed too.
        first = min(rank * per_rank, size)
        indices = list(range(first, min(first + per_rank, size)))
        if not indices:
            logger.warning("validation set of %d samples leaves rank %d without samples", size, rank)
        batches = [
            [(i, i) for i in indices[j : j + self.micro_batch_size]]
            for j in range(0, len(indices), self.micro_batch_size)
        ]
        return DataLoader(
            _Positioned(self.val_set),
            batch_sampler=batches,
            collate_fn=collate_with_positions,
            **self._loader_kwargs(),
        )


class _FirstBatches:
    """The first ``num_batches`` batches of a streaming reader, numbered like `_StreamLoader`."""

    def __init__(self, loader: DataLoader, num_batches: int, rank: int, world_size: int) -> None:
        self.loader, self.num_batches, self.rank, self.world_size = loader, num_batches, rank, world_size

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        sample = 0
        for i, batch in enumerate(self.loader):
            if i >= self.num_batches:
                return
            batch.pop(SKIPPED_KEY, None)  # validation skips are logged by the reader, not counted
            size = len(batch["latents"])
            batch["position"] = (
                torch.arange(sample, sample + size, dtype=torch.int64) * self.world_size + self.rank
            )
            sample += size
            yield batch

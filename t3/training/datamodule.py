"""Training data for `T3FinetuneModule`: resumable, rank-aware loaders around the `t3.data` readers.

The readers themselves live in `t3.data` (``build_latent_dataset`` for latent shards,
``SyntheticLatentDataset`` for procedural videos, ``prepare_shards`` for raw videos); the ``data/`` config
group names them as Hydra ``_target_``s. This module adds what training needs on top:

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
"""

from __future__ import annotations

import logging
import os
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from t3.data import SKIPPED_KEY, collate_samples

__all__ = [
    "SkipTally",
    "StepSampler",
    "T3DataModule",
    "held_out_shards",
    "prepare_video_shards",
    "synthetic_latents",
]

logger = logging.getLogger(__name__)


# --- dataset factories (Hydra targets of conf/data/*.yaml) -------------------------------------------------


_ENCODERS: dict[tuple[Any, ...], tuple[Any, Any]] = {}


def _vae_and_text_encoder(model: Mapping[str, Any], cache_dir: str | os.PathLike) -> tuple[Any, Any]:
    """The model's VAE and text encoder from local paths, or tiny random ones for the ``tiny`` preset.

    Loaded once per process: the training and validation sets share them (umT5-XXL alone is 11 GB).
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


def synthetic_latents(
    num_samples: int,
    *,
    height: int,
    width: int,
    num_frames: int,
    seed: int,
    model: Mapping[str, Any],
    cache_dir: str,
    fps: float = 16.0,
) -> Dataset:
    """Procedural moving-shape videos encoded with the model's VAE and text encoder (`t3.data`).

    Each sample is encoded once and cached on disk under ``cache_dir/synthetic``, so reruns and other
    ranks reuse it.

    Args:
        num_samples: Videos in the set.
        height: Frame height in pixels.
        width: Frame width in pixels.
        num_frames: Frames per video (``4k + 1``).
        seed: Seed of the set (a different seed gives a disjoint-looking set, e.g. for validation).
        model: The ``model`` config (preset, ``vae_path``, ``text_encoder_path``).
        cache_dir: Cache root (``paths.cache_dir``).
        fps: Nominal frame rate.
    """
    from t3.data import SyntheticLatentDataset

    vae, text_encoder = _vae_and_text_encoder(model, cache_dir)
    return SyntheticLatentDataset(
        num_samples,
        vae=vae,
        text_encoder=text_encoder,
        frames=num_frames,
        height=height,
        width=width,
        seed=seed,
        fps=fps,
        cache_dir=Path(cache_dir) / "synthetic",
        tiled=height * width > 512 * 512,  # the VAE needs tiles only for large frames
    )


def held_out_shards(urls_or_dir: str | None, **kwargs: Any) -> IterableDataset | None:
    """``t3.data.build_latent_dataset`` for validation, or None (no validation loss) without shards.

    Args:
        urls_or_dir: Held-out shards; None disables the validation loss.
        **kwargs: Passed to ``build_latent_dataset``.
    """
    if urls_or_dir is None:
        return None
    from t3.data import build_latent_dataset

    return build_latent_dataset(urls_or_dir, **kwargs)


def prepare_video_shards(
    video_list: str,
    out_dir: str,
    *,
    height: int,
    width: int,
    num_frames: int,
    fps: float | None,
    model: Mapping[str, Any],
    samples_per_shard: int = 64,
    max_upscale: float = 1.0,
) -> Path:
    """Encode the videos of ``video_list`` into latent shards in ``out_dir`` (`t3.data.prepare_shards`).

    Runs once, on global rank 0, before training (Lightning's ``prepare_data``); it is resumable, so a
    restarted run only encodes what is missing.

    Args:
        video_list: CSV (``path,caption``), JSON lines or JSON array of videos and captions.
        out_dir: Shard folder.
        height: Clip height in pixels.
        width: Clip width in pixels.
        num_frames: Frames per clip.
        fps: Frame rate to sample clips at; None keeps each video's own.
        model: The ``model`` config (preset, ``vae_path``, ``text_encoder_path``).
        samples_per_shard: Videos per shard.
        max_upscale: Largest resize factor allowed (smaller videos are skipped).
    """
    from t3.data import check_prepare_arguments, prepare_shards, read_video_list
    from t3.models import PromptEmbeddingCache, get_spec

    spec = get_spec(model["preset"])
    check_prepare_arguments(  # before the encoders are loaded
        spec,
        height=height,
        width=width,
        frames=num_frames,
        fps=fps,
        max_upscale=max_upscale,
        samples_per_shard=samples_per_shard,
        name=lambda key: f"data.prepare.{'num_frames' if key == 'frames' else key}",
    )
    entries = read_video_list(video_list)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    vae, text_encoder = _vae_and_text_encoder(model, Path(out_dir).parent)
    vae = vae.to(device)
    text_encoder.to(device)
    result = prepare_shards(
        entries,
        out_dir,
        vae=vae,
        text_cache=PromptEmbeddingCache(text_encoder, max_length=spec.text_len),
        spec=spec,
        height=height,
        width=width,
        frames=num_frames,
        fps=fps,
        samples_per_shard=samples_per_shard,
        max_upscale=max_upscale,
        info={"video_list": str(video_list)},
    )
    logger.info("prepared latent shards in %s: %s", out_dir, result)
    return Path(out_dir)


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
        rank: This process's rank.
        world_size: Processes.
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
        rank: This process's rank.
        world_size: Processes.
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
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

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

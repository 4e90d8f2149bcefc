"""Lightning callbacks of a t3 training run: progress, step timing, EMA of the trainable weights, sample videos.

* `ProgressLog` logs step, loss, learning rate, seconds per step and ETA every few optimizer steps on
  rank 0 (the console and ``${run_dir}/train.log``), and shows a progress bar when attached to a terminal.
* `StepCheckpoint` is Lightning's ``ModelCheckpoint`` that also saves when training ends off the
  checkpoint interval, so ``last.ckpt`` always holds the final step, and keeps the newest few.
* `StepTimer` logs ``perf/step_time_s``, ``perf/samples_per_s``, ``perf/tokens_per_s`` (the step's own
  work: data loading excluded), ``perf/data_wait_s`` and, on CUDA, ``perf/peak_mem_gb`` once per
  optimizer step.
* `DataSkipMonitor` totals the skipped training data by reason over workers and ranks, logs it
  (``data/skipped*``) and stops the run past ``data.max_skipped_fraction``.
* `EMACallback` keeps an fp32 exponential moving average of the trainable weights; its state is part of
  every checkpoint (so a resumed EMA is exact) and `t3.training.export` writes it beside the raw weights.
* `SampleVideoCallback` generates a few videos at each validation with the model being trained and logs
  them to wandb as mp4. Prompts are encoded once on rank 0 and broadcast, the DiT runs on every rank (it
  may be sharded), the VAE decodes on rank 0 only.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from t3.config import SampleVideosConfig

__all__ = [
    "DataSkipError",
    "DataSkipMonitor",
    "EMACallback",
    "ProgressLog",
    "SampleVideoCallback",
    "StepCheckpoint",
    "StepTimer",
]

logger = logging.getLogger(__name__)


def _duration(seconds: float) -> str:
    """``1h02m``, ``3m05s`` or ``42s``."""
    seconds = max(int(round(seconds)), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class ProgressLog(Callback):
    """One line every ``every_n_steps`` optimizer steps (and at the first and last step), on rank 0:

        step 120/5000 (2.4%) | loss 0.1234 | lr 2.00e-05 | 3.21 s/step | ETA 4h21m

    The lines go through `logging`, so they reach the console and ``${run_dir}/train.log`` and a SLURM
    ``.out`` file shows plain periodic lines. Seconds per step are wall time over the last interval
    (validation and checkpoints included, as they will be in the remaining steps), and the ETA is the
    remaining steps at that rate. On a terminal a tqdm bar over the optimizer steps is shown as well,
    with the log lines printed above it.

    Args:
        every_n_steps: Optimizer steps between lines.
        max_steps: The run's last step.
        bar: Show the bar; None: when stderr is a terminal.
    """

    def __init__(self, every_n_steps: int, max_steps: int, bar: bool | None = None) -> None:
        self.every_n_steps = every_n_steps
        self.max_steps = max_steps
        self.bar = sys.stderr.isatty() if bar is None else bar
        self._mark: tuple[int, float] = (0, 0.0)  # (step, time) of the last line, or of the start
        self._last_step: int | None = None
        self._lines = 0
        self._progress: Any = None
        self._redirect = contextlib.ExitStack()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step
        self._mark = (trainer.global_step, time.perf_counter())
        self._lines = 0
        if trainer.is_global_zero and self.bar:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            # Log lines printed through the bar instead of breaking it.
            self._redirect.enter_context(logging_redirect_tqdm(loggers=[logging.getLogger()]))
            self._progress = tqdm(
                total=self.max_steps, initial=trainer.global_step, unit="step", dynamic_ncols=True
            )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step == self._last_step or not trainer.is_global_zero:  # still accumulating, or not rank 0
            return
        self._last_step = step
        loss = trainer.callback_metrics.get("train/loss")
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")
        if self._progress is not None:
            self._progress.update(step - self._progress.n)
            self._progress.set_postfix(loss=f"{float(loss):.4g}" if loss is not None else "-", lr=f"{lr:.2e}")
        if not (self._lines == 0 or step % self.every_n_steps == 0 or step >= self.max_steps):
            return
        self._lines += 1
        now = time.perf_counter()
        per_step = (now - self._mark[1]) / max(step - self._mark[0], 1)
        self._mark = (step, now)
        logger.info(
            "step %d/%d (%.1f%%) | loss %s | lr %.2e | %.2f s/step | ETA %s",
            step, self.max_steps, 100.0 * step / self.max_steps,
            f"{float(loss):.4f}" if loss is not None else "-", lr, per_step,
            _duration(per_step * (self.max_steps - step)),
        )  # fmt: skip

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        self._redirect.close()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self.on_train_end(trainer, pl_module)


class StepCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that also saves at the end of training when the last step was not saved.

    It keeps the newest ``save_top_k`` checkpoints when it monitors ``step`` (``mode="max"``), and removes
    a checkpoint's checksum file with it.

    With ``every_n_train_steps`` alone, a run whose ``max_steps`` is not a multiple of the interval would
    leave ``last.ckpt`` behind its final weights, and rerunning it with a larger ``max_steps`` would redo
    those steps.
    """

    @property
    def state_key(self) -> str:
        # Lightning keys callback state by the callback's settings: a run restarted with another
        # checkpoint interval would lose it, write last-v1.ckpt beside a stale last.ckpt and later resume
        # from the stale one. A run has one StepCheckpoint, so a fixed key is safe.
        return "StepCheckpoint"

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        super().on_train_end(trainer, pl_module)

    def _remove_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._remove_checkpoint(trainer, filepath)
        if trainer.is_global_zero:  # its checksum file (t3.training.checkpoints) goes with it
            from t3.training.checkpoints import checksum_file

            checksum_file(filepath).unlink(missing_ok=True)


class StepTimer(Callback):
    """Time per optimizer step spent training, the time spent waiting for data, and the throughput.

    A step's time is the sum over its micro-batches of the work from ``on_train_batch_start`` to
    ``on_train_batch_end`` (forward, backward, optimizer); the time between micro-batches, when Lightning
    fetches the next batch, is ``perf/data_wait_s`` (it also holds a checkpoint save when one is due, and
    one-time work of the loader such as encoding a sample on its first read). Throughput is computed
    from the step time. Validation is neither. Logs every step's figures; `summary` gives the run's
    typical step (the median, without the first step of this process, which includes start-up) for run
    summaries and sweep reports.

    Args:
        global_batch_size: Samples per optimizer step (all ranks).
        tokens_per_sample: Video tokens per sample (post-patch grid size).
    """

    def __init__(self, global_batch_size: int, tokens_per_sample: int) -> None:
        self.global_batch_size = global_batch_size
        self.tokens_per_sample = tokens_per_sample
        self._last_step: int | None = None
        self._mark = 0.0  # when the last timed interval ended
        self._work = self._wait = 0.0  # accumulated over the micro-batches of the current step
        self.step_seconds: list[float] = []
        self.wait_seconds: list[float] = []

    def _elapsed(self) -> float:
        now = time.perf_counter()
        seconds, self._mark = now - self._mark, now
        return seconds

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step, self._mark = trainer.global_step, time.perf_counter()
        self._work = self._wait = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._wait += self._elapsed()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # kernels are asynchronous; time the work, not its launch
        self._work += self._elapsed()
        if trainer.global_step == self._last_step:  # still accumulating
            return
        assert self._last_step is not None
        steps = max(trainer.global_step - self._last_step, 1)
        seconds, wait = self._work / steps, self._wait / steps
        self._last_step, self._work, self._wait = trainer.global_step, 0.0, 0.0
        self.step_seconds.append(seconds)
        self.wait_seconds.append(wait)
        metrics = self._figures(seconds, wait)
        if torch.cuda.is_available():
            metrics["perf/peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)

    def _figures(self, seconds: float, wait: float) -> dict[str, float]:
        return {
            "perf/step_time_s": seconds,
            "perf/samples_per_s": self.global_batch_size / seconds,
            "perf/tokens_per_s": self.global_batch_size * self.tokens_per_sample / seconds,
            "perf/data_wait_s": wait,
        }

    def summary(self) -> dict[str, float]:
        """Median step time and data wait (first step of this process left out when there are others)."""
        if not self.step_seconds:
            return {}
        first = 1 if len(self.step_seconds) > 1 else 0
        figures = self._figures(
            statistics.median(self.step_seconds[first:]), statistics.median(self.wait_seconds[first:])
        )
        figures["perf/steps_timed"] = float(len(self.step_seconds) - first)
        if torch.cuda.is_available():
            figures["perf/peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
        return figures

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Validation time is neither training step time nor data wait.
        self._mark = time.perf_counter()


class DataSkipError(RuntimeError):
    """More of the training data was skipped than ``data.max_skipped_fraction`` allows."""


class DataSkipMonitor(Callback):
    """Totals the training data skipped by reason over workers and ranks, logs it, and stops past a limit.

    Once per optimizer step the per-rank counts of the data module (`t3.training.datamodule.SkipTally`)
    are summed over the ranks (one small all-reduce) and logged as ``data/skipped`` (items skipped in
    total), ``data/skipped_<reason>`` (each reason met so far) and ``data/skipped_fraction`` (skipped
    over skipped plus delivered samples); the last values land in ``summary.json`` with the other metrics.
    The run stops with `DataSkipError` when the fraction exceeds ``max_fraction``: from
    ``min_items`` items read on (a few bad samples early on must not stop a healthy run), and at the end of
    training whatever the count.

    Under sequence parallelism the ``sp`` ranks of an SP group read the same samples and skip the same
    items, so the sum over the ranks is divided by ``sp``: each item is counted once.

    Args:
        max_fraction: Largest tolerated fraction; None never stops.
        min_items: Items read (samples plus skips) before the fraction is judged during training.
        sequence_parallel_size: Ranks that share each sample (``parallel.sequence_parallel_size``).
    """

    def __init__(
        self, max_fraction: float | None, min_items: int = 1000, *, sequence_parallel_size: int = 1
    ) -> None:
        from t3.data import SKIP_REASONS

        self.max_fraction = max_fraction
        self.min_items = min_items
        self.sequence_parallel_size = sequence_parallel_size
        self.reasons = SKIP_REASONS
        self.counts: dict[str, float] = {}
        self._last_step: int | None = None

    def _tally(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        tally = getattr(trainer.datamodule, "skip_tally", None)
        local = [0.0] * (len(self.reasons) + 1)
        if tally is not None:
            local = [float(tally.samples), *(float(tally.skipped[r]) for r in self.reasons)]
        totals = trainer.strategy.reduce(
            torch.tensor(local, dtype=torch.float64, device=pl_module.device), reduce_op="sum"
        )
        totals = (totals / self.sequence_parallel_size).tolist()  # exact: a group's counts are equal
        return {"samples": totals[0], **dict(zip(self.reasons, totals[1:], strict=True))}

    def _metrics(self) -> dict[str, float]:
        skipped = sum(self.counts[r] for r in self.reasons)
        read = skipped + self.counts["samples"]
        metrics = {"data/skipped": skipped, "data/skipped_fraction": skipped / read if read else 0.0}
        metrics.update({f"data/skipped_{r}": self.counts[r] for r in self.reasons if self.counts[r]})
        return metrics

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step == self._last_step:  # still accumulating
            return
        self._last_step = trainer.global_step
        self.counts = self._tally(trainer, pl_module)  # collective: every rank is here at the same step
        metrics = self._metrics()
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)
        read = metrics["data/skipped"] + self.counts["samples"]
        if read >= self.min_items:
            self._check(metrics)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.counts:
            self._check(self._metrics())

    def _check(self, metrics: dict[str, float]) -> None:
        fraction = metrics["data/skipped_fraction"]
        if self.max_fraction is None or fraction <= self.max_fraction:
            return
        skipped = int(metrics["data/skipped"])
        reasons = ", ".join(f"{r}={int(self.counts[r])}" for r in self.reasons if self.counts[r])
        raise DataSkipError(
            f"{100 * fraction:.1f}% of the training data was skipped ({skipped} of "
            f"{skipped + int(self.counts['samples'])} items: {reasons}), more than "
            f"data.max_skipped_fraction={self.max_fraction:g}; fix the data (each skip is logged with its "
            "shard and key) or raise the limit"
        )


class EMACallback(Callback):
    """fp32 exponential moving average of the trainable DiT weights, updated after every optimizer step.

    The EMA needs whole parameters on every rank, so it runs with one device, DDP or DeepSpeed ZeRO-1/2
    (`t3.config.validate` rejects it with ZeRO-3 and FSDP2).

    Args:
        decay: ``ema = decay * ema + (1 - decay) * weight``.
    """

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.shadow: dict[str, torch.Tensor] | None = None
        self._last_step: int | None = None

    @staticmethod
    def _trainable(pl_module: L.LightningModule) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in pl_module.dit.named_parameters() if p.requires_grad}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step
        params = self._trainable(pl_module)
        if self.shadow is None:
            self.shadow = {n: p.detach().float().clone() for n, p in params.items()}
        else:  # restored from a checkpoint, possibly saved from another device
            self.shadow = {n: t.to(params[n].device) for n, t in self.shadow.items()}

    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step == self._last_step or self.shadow is None:
            return
        self._last_step = trainer.global_step
        params = self._trainable(pl_module)
        names = list(self.shadow)
        torch._foreach_lerp_(
            [self.shadow[n] for n in names], [params[n].detach().float() for n in names], 1.0 - self.decay
        )

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.shadow = state_dict.get("shadow")


class SampleVideoCallback(Callback):
    """Generate and log sample videos at the end of each validation.

    Skips itself (with one log line) when no mp4 encoder is available (`t3.video_io.available_encoder`).

    Args:
        cfg: Prompts, size, steps, guidance, seed, fps.
        model: The ``model`` config (``vae_path``, ``text_encoder_path``, preset).
        size: Default ``(height, width, num_frames)`` (the training size).
        flow_shift: Sampler shift.
        out_dir: Where the mp4s go (``<out_dir>/step_<n>/``).
        cache_dir: Cache root, for the tiny test encoders.
    """

    def __init__(
        self,
        cfg: SampleVideosConfig,
        *,
        model: Mapping[str, Any],
        size: tuple[int, int, int],
        flow_shift: float,
        out_dir: str | Path,
        cache_dir: str | Path,
    ) -> None:
        self.cfg = cfg
        self.model = dict(model)
        self.height = cfg.height or size[0]
        self.width = cfg.width or size[1]
        self.num_frames = cfg.num_frames or size[2]
        self.flow_shift = flow_shift
        self.out_dir = Path(out_dir)
        self.cache_dir = Path(cache_dir)
        self._embeddings: torch.Tensor | None = None
        self._negative: torch.Tensor | None = None
        self._vae: Any = None
        self._disabled = False

    def _setup(self, trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
        if self._disabled:
            return False
        if self._embeddings is not None:
            return True
        from t3.video_io import available_encoder

        try:
            available_encoder()
        except Exception as err:  # no PyAV or no mp4 encoder: this optional feature goes, never the run
            logger.warning("sample videos disabled: %s", err)
            self._disabled = True
            return False
        embeddings = None
        if trainer.is_global_zero:
            from t3.generate import WAN_NEGATIVE_PROMPT
            from t3.models import PromptEmbeddingCache, get_spec
            from t3.models.encoders import vae_and_text_encoder

            vae, text_encoder = vae_and_text_encoder(self.model, self.cache_dir)
            cache = PromptEmbeddingCache(text_encoder, max_length=get_spec(self.model["preset"]).text_len)
            positive, _ = cache.get(list(self.cfg.prompts))
            negative, _ = cache.get([WAN_NEGATIVE_PROMPT])
            embeddings = (positive, negative)
            self._vae = vae.to(pl_module.device).eval()
            del text_encoder, cache  # the text encoder is large; only its outputs are needed
        embeddings = trainer.strategy.broadcast(embeddings, src=0)
        self._embeddings, self._negative = embeddings
        return True

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not self._setup(trainer, pl_module):
            return
        from t3.diffusion import build_scheduler, sample
        from t3.models import decode_latents, get_spec
        from t3.video_io import write_video

        spec = get_spec(self.model["preset"])
        shape = spec.latent_shape(self.num_frames, self.height, self.width)
        dtype = pl_module._compute_dtype()
        device = pl_module.device
        folder = self.out_dir / f"step_{trainer.global_step:07d}"
        paths = []
        for i, prompt in enumerate(self.cfg.prompts):
            generator = torch.Generator().manual_seed(self.cfg.seed + i)
            cond = {"encoder_hidden_states": self._embeddings[i : i + 1].to(device, dtype)}
            uncond = {"encoder_hidden_states": self._negative.to(device, dtype)}
            latents = sample(
                lambda x, t, **kw: pl_module._model_fn(x, t, **kw),
                (1, *shape),
                cond,
                uncond,
                scheduler=build_scheduler("unipc", flow_shift=self.flow_shift),
                num_steps=self.cfg.num_steps,
                guidance_scale=self.cfg.guidance_scale,
                generator=generator,
                dtype=dtype,
                device=device,
                progress=False,
            )
            if trainer.is_global_zero:
                video = decode_latents(self._vae, latents, tiled=self.height * self.width > 512 * 512)[0]
                frames = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
                frames = frames.permute(1, 2, 3, 0).cpu().numpy()  # [F, H, W, 3]
                folder.mkdir(parents=True, exist_ok=True)
                paths.append(write_video(folder / f"sample_{i:02d}.mp4", frames, fps=self.cfg.fps))
                logger.info("sample video %d (%r) -> %s", i, prompt, paths[-1])
        if trainer.is_global_zero and paths:
            _log_videos(trainer, paths, self.cfg.prompts)


def _log_videos(trainer: L.Trainer, paths: Sequence[Path], prompts: Sequence[str]) -> None:
    from lightning.pytorch.loggers import WandbLogger

    for lg in trainer.loggers:
        if isinstance(lg, WandbLogger):
            import wandb

            lg.experiment.log(
                {
                    "samples/video": [
                        wandb.Video(str(p), caption=c, format="mp4")
                        for p, c in zip(paths, prompts, strict=False)
                    ],
                    "trainer/global_step": trainer.global_step,
                }
            )

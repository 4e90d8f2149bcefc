"""`T3FinetuneModule`: fine-tune a pretrained Wan DiT after the T3 attention swap, with flow matching.

``configure_model`` builds the DiT (pretrained, a stage-1 export, or random for tests) and prepares it
for fine-tuning (`t3.training.finetune.prepare_for_finetuning`: the T3 swap with the configured schedule,
the trainable weights), turns on per-block gradient checkpointing, under sequence parallelism shards each
sample's tokens over its SP group (`t3.training.strategies.sequence_parallelize`) and, under FSDP2, shards
the weights. It is idempotent, as Lightning requires for sharded strategies. Parallelism is chosen by the ``strategy``
config; what differs per strategy at run time (how a skipped step is returned, the gradient norm) is
asked of `t3.training.strategies`, so nothing here branches on it.

Under sequence parallelism every rank of an SP group reads the same samples (`t3.training.datamodule`),
draws the same noise from their positions and returns the same full-sample loss; the loss is multiplied
by ``loss_scale`` (1 for every strategy: `t3.parallel.loss`), and the logged loss, a mean over all ranks,
counts every SP group ``sp`` times, i.e. it is the mean over samples.

Randomness is per sample: the noise level and noise of the sample at stream position ``p`` come from a
generator seeded with ``(seed, p)`` (`t3.diffusion.sample_seed`; positions: `t3.training.datamodule`), so
a global batch gives the same loss however it is split over GPUs and micro-batches, and a resumed run
continues bit-identically on the CPU.

Non-finite losses: every rank learns whether any rank saw one, so all ranks take the same branch, and the
micro-batch is skipped (`t3.training.strategies.skipped_loss`), counted in ``train/num_skipped_nonfinite``
and, after ``max_consecutive_bad_steps`` in a row, training stops with `NonFiniteLossError`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
from torch import nn

import t3
from t3.config import FinetuneConfig, ModelConfig, ObjectiveConfig, OptimConfig, ValidationConfig
from t3.diffusion import (
    build_loss_weighting,
    build_timestep_sampler,
    flow_matching_loss_at,
    heldout_loss,
    sample_seed,
)
from t3.training.finetune import TrainableSummary, build_dit, prepare_for_finetuning
from t3.training.optim import build_lr_scheduler, build_optimizer
from t3.training.strategies import any_rank, deepspeed_gradient_norm, gradient_norm, skipped_loss

__all__ = ["NonFiniteLossError", "T3FinetuneModule"]

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many consecutive micro-batches with a NaN or infinite loss."""


class T3FinetuneModule(L.LightningModule):
    """Flow-matching fine-tuning of a T3-transformed Wan DiT.

    Args:
        model: Which DiT and where its weights are.
        schedule: The T3 `Schedule` swapped into every self-attention.
        finetune: Trainable weights, gradient checkpointing, activation offload.
        optim: AdamW and learning-rate schedule.
        objective: Timestep distribution and loss weighting (validation losses stay unweighted).
        validation: Fixed validation noise levels and seed.
        max_steps: Optimizer steps of the run (length of a cosine schedule).
        seed: Seed of the per-sample training noise.
        accumulate: Micro-batches per optimizer step (for step-level logging).
        max_consecutive_bad_steps: Stop after this many non-finite micro-batches in a row.
        cpu_offload_optimizer: DeepSpeed keeps the optimizer on the CPU (needs DeepSpeedCPUAdam).
        parallelize: ``fn(dit, device_mesh, param_dtype=...)`` applied in ``configure_model`` when the
            strategy provides a device mesh (FSDP2).
        param_dtype: Compute dtype handed to ``parallelize`` (bf16 on GPU).
        sequence_parallelize: ``fn(dit) -> dit`` applied in ``configure_model`` before ``parallelize``
            (`t3.training.strategies.sequence_parallelize`); None: no sequence parallelism.
        loss_scale: Factor on the loss each rank back-propagates
            (`t3.training.strategies.sequence_parallel_loss_scale`).
    """

    def __init__(
        self,
        *,
        model: ModelConfig,
        schedule: t3.Schedule,
        finetune: FinetuneConfig,
        optim: OptimConfig,
        objective: ObjectiveConfig,
        validation: ValidationConfig,
        max_steps: int,
        seed: int,
        accumulate: int = 1,
        max_consecutive_bad_steps: int = 5,
        cpu_offload_optimizer: bool = False,
        parallelize: Callable[..., nn.Module] | None = None,
        param_dtype: torch.dtype | None = None,
        sequence_parallelize: Callable[[nn.Module], nn.Module] | None = None,
        loss_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.model_cfg = model
        self.schedule = schedule
        self.finetune = finetune
        self.optim_cfg = optim
        self.objective = objective
        self.validation_cfg = validation
        self.max_steps = max_steps
        self.seed = seed
        self.accumulate = accumulate
        self.max_consecutive_bad_steps = max_consecutive_bad_steps
        self.cpu_offload_optimizer = cpu_offload_optimizer
        self.parallelize = parallelize
        self.param_dtype = param_dtype
        self.sequence_parallelize = sequence_parallelize
        self.loss_scale = loss_scale
        sampler_params = {
            "shifted": {"shift": objective.flow_shift},
            "shifted_discrete": {
                "shift": objective.flow_shift,
                "num_timesteps": objective.num_train_timesteps,
            },
            "logit_normal": {"mean": objective.logit_mean, "std": objective.logit_std},
        }
        self.sampler = build_timestep_sampler(
            objective.timestep_sampler, **sampler_params.get(objective.timestep_sampler, {})
        )
        self.weighting = build_loss_weighting(
            objective.loss_weighting,
            shift=objective.flow_shift,
            num_train_timesteps=objective.num_train_timesteps,
        )
        self.dit: nn.Module | None = None
        self.trainable_summary: TrainableSummary | None = None
        # Non-finite guard and step-level loss bookkeeping (the first two are saved in checkpoints).
        self.num_skipped_nonfinite = 0
        self.consecutive_bad = 0
        self._step_losses: list[torch.Tensor] = []
        self._grad_norm_step = -1

    # --- model -----------------------------------------------------------------------------------------

    def configure_model(self) -> None:
        if self.dit is not None:  # Lightning may call this more than once
            return
        dit = build_dit(self.model_cfg)
        self.trainable_summary = prepare_for_finetuning(dit, self.schedule, self.model_cfg, self.finetune)
        if self.finetune.gradient_checkpointing:
            dit.enable_gradient_checkpointing()
        dit.train()
        if self.sequence_parallelize is not None:  # hooks only: FSDP2 below wraps the same modules
            dit = self.sequence_parallelize(dit)
        if self.parallelize is not None and self._device_mesh is not None:
            dit = self.parallelize(dit, self._device_mesh, param_dtype=self.param_dtype)
        self.dit = dit

    def _compute_dtype(self) -> torch.dtype:
        # DeepSpeed bf16 casts the module itself (no autocast), so inputs must follow the weights; under
        # autocast (bf16-mixed with fp32 weights) fp32 inputs are right.
        assert self.dit is not None
        return self.dit.patch_embedding.weight.dtype

    def _model_fn(
        self, x: torch.Tensor, timestep: torch.Tensor, *, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        dtype = self._compute_dtype()
        assert self.dit is not None
        return self.dit(
            hidden_states=x.to(dtype),
            timestep=timestep,
            encoder_hidden_states=encoder_hidden_states.to(dtype),
            return_dict=False,
        )[0]

    def _activation_context(self) -> contextlib.AbstractContextManager:
        if self.finetune.offload_activations and torch.is_grad_enabled():
            # With per-block checkpointing the saved tensors are mostly the block inputs (non-reentrant
            # checkpointing saves them through the autograd hooks this installs); they go to CPU memory.
            return torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())
        return contextlib.nullcontext()

    # --- per-sample randomness ---------------------------------------------------------------------------

    def _draw(self, positions: torch.Tensor, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise level ``[B]`` and noise ``like x0`` of each sample, seeded by its stream position."""
        sigmas, noises = [], []
        for position in positions.tolist():
            generator = torch.Generator(device=x0.device).manual_seed(sample_seed(self.seed, position))
            sigmas.append(self.sampler.sample(1, generator, x0.device))
            noises.append(
                torch.randn(x0.shape[1:], generator=generator, device=x0.device, dtype=torch.float32)
            )
        return torch.cat(sigmas), torch.stack(noises)

    # --- training ----------------------------------------------------------------------------------------

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor | None:
        x0, text = batch["latents"], batch["text"]
        sigma, noise = self._draw(batch["position"], x0)
        with self._activation_context():
            loss, _ = flow_matching_loss_at(
                self._model_fn,
                x0,
                {"encoder_hidden_states": text},
                sigma,
                noise,
                num_train_timesteps=self.objective.num_train_timesteps,
                weighting=self.weighting,
            )
        bad = any_rank(self.trainer.strategy, not bool(torch.isfinite(loss.detach())), self.device)
        if bad:
            self.num_skipped_nonfinite += 1
            self.consecutive_bad += 1
        else:
            self.consecutive_bad = 0
        self._end_of_micro_batch(loss.detach(), bad)
        if not bad:
            # The sample's loss; under sequence parallelism every rank of an SP group holds it, and the
            # scale makes the strategy's gradient averaging over all ranks the data-parallel mean.
            return loss * self.loss_scale
        logger.warning(
            "non-finite loss at step %d (positions %s): skipping (%d in a row, %d in total)",
            self.global_step,
            batch["position"].tolist(),
            self.consecutive_bad,
            self.num_skipped_nonfinite,
        )
        if self.consecutive_bad >= self.max_consecutive_bad_steps:
            raise NonFiniteLossError(
                f"{self.consecutive_bad} consecutive micro-batches had a non-finite loss (last at step "
                f"{self.global_step}); stopping. Lower optim.lr, check the data, or resume from an earlier "
                "checkpoint"
            )
        return skipped_loss(self.trainer.strategy, loss)

    def _end_of_micro_batch(self, loss: torch.Tensor, bad: bool) -> None:
        """Collect micro-batch losses; on the step's last micro-batch log their mean over all ranks."""
        self._step_losses.append(loss.float() if not bad else torch.full_like(loss.float(), float("nan")))
        if len(self._step_losses) < self.accumulate:
            return
        losses = torch.stack(self._step_losses)
        self._step_losses = []
        good = torch.isfinite(losses)
        total = torch.stack([torch.where(good, losses, 0).sum(), good.sum().float()])
        total = self.trainer.strategy.reduce(total, reduce_op="sum")
        step_loss = total[0] / total[1].clamp(min=1) if total[1] > 0 else total[0] * float("nan")
        self.log("train/loss", step_loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=1)
        self.log(
            "train/num_skipped_nonfinite",
            float(self.num_skipped_nonfinite),
            on_step=True,
            on_epoch=False,
            batch_size=1,
        )
        scheduler = self.lr_schedulers()
        lr = scheduler.get_last_lr()[0] if scheduler is not None else self.optim_cfg.lr  # type: ignore[union-attr]
        self.log("train/lr", float(lr), on_step=True, on_epoch=False, batch_size=1)

    # --- validation --------------------------------------------------------------------------------------

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        # The held-out recipe (fixed levels, noise fixed by position) the CPU demo's comparison uses too.
        x0, text = batch["latents"], batch["text"]
        sigmas = self.validation_cfg.sigmas
        losses = heldout_loss(
            self._model_fn,
            x0,
            {"encoder_hidden_states": text},
            batch["position"].tolist(),
            sigmas=sigmas,
            seed=self.validation_cfg.seed,
            num_train_timesteps=self.objective.num_train_timesteps,
        ).mean(dim=1)
        batch_size = len(x0)
        for sigma, loss in zip(sigmas, losses, strict=True):
            self.log(f"val/loss_sigma_{sigma:g}", loss, sync_dist=True, on_epoch=True, batch_size=batch_size)
        self.log(
            "val/loss", losses.mean(), sync_dist=True, on_epoch=True, prog_bar=True, batch_size=batch_size
        )

    # --- optimisation ------------------------------------------------------------------------------------

    def configure_optimizers(self) -> dict[str, Any]:
        assert self.dit is not None, "configure_model() first"
        optimizer = build_optimizer(
            self.dit.parameters(), self.optim_cfg, cpu_offload=self.cpu_offload_optimizer
        )
        scheduler = build_lr_scheduler(optimizer, self.optim_cfg, self.max_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Before clipping: the raw gradient norm (None under DeepSpeed: see on_train_batch_end).
        if self.dit is None:
            return
        norm = gradient_norm(self.trainer.strategy, self.dit.parameters())
        if norm is not None:
            self.log("train/grad_norm", norm, on_step=True, on_epoch=False, batch_size=1)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # DeepSpeed computes the gradient norm inside its step; read it once per optimizer step.
        if self.global_step != self._grad_norm_step:
            self._grad_norm_step = self.global_step
            norm = deepspeed_gradient_norm(self.trainer)
            if norm is not None:
                self.log("train/grad_norm", norm, on_step=True, on_epoch=False, batch_size=1)

    # --- checkpoint state --------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["t3_nonfinite"] = {
            "num_skipped": self.num_skipped_nonfinite,
            "consecutive": self.consecutive_bad,
        }

    def on_load_checkpoint(self, checkpoint: Mapping[str, Any]) -> None:
        state = checkpoint.get("t3_nonfinite", {})
        self.num_skipped_nonfinite = int(state.get("num_skipped", 0))
        self.consecutive_bad = int(state.get("consecutive", 0))

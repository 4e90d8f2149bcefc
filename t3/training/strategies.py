"""Parallelism chosen by config: DeepSpeed ZeRO-1/2/3 (optional CPU offload), DDP, FSDP2, one device.

`build_strategy` turns the ``strategy`` config group into a Lightning strategy; the model code never
branches on it (torchtitan's rule). The one model-side hook, FSDP2's per-block sharding, is the function
`fsdp2_parallelize` that the LightningModule applies when the strategy hands it a device mesh.

Sequence parallelism (``parallel.sequence_parallel_size`` > 1, `t3.parallel`) is applied the same way,
from outside: `sequence_parallelize` builds the SP process groups and hooks the DiT in ``configure_model``
(after the T3 swap and gradient checkpointing, before FSDP2 sharding); the strategies themselves run
unchanged over all ranks. `sequence_parallel_loss_scale` is the factor on each rank's loss that makes
their gradient averaging exact (1 for every strategy here: `t3.parallel.loss`).

CPU DeepSpeed
-------------
Lightning's ``DeepSpeedStrategy.setup_environment`` raises unless the accelerator is a
``CUDAAccelerator``, its ``setup_distributed`` checks CUDA device indices against local ranks, and it
hands ``deepspeed.initialize`` the CUDA index of the root device (None on the CPU). DeepSpeed itself runs ZeRO-1/2/3 on the CPU with its CPU accelerator
(``DS_ACCELERATOR=cpu``, chosen when DeepSpeed is first imported) over the gloo backend, which is how
the distributed tests run on machines without GPUs. `T3DeepSpeedStrategy` overrides only these three spots,
and only for the CPU accelerator; everything else is Lightning's code path.

It also stops DeepSpeed from dividing the loss by the accumulation steps a second time (Lightning does it
already; see `T3DeepSpeedStrategy.backward`), and defaults ``zero_init`` to off: ``configure_model`` then builds the full model on every rank with
the ordinary loaders, and ZeRO-3 partitions the parameters in ``deepspeed.initialize``. The full bf16
DiT (2.6 GB for Wan2.1-1.3B, 10 GB for Wan2.2-5B) fits one GPU, so this costs only a transient copy and
keeps weight loading identical across strategies.

What differs per strategy at run time
-------------------------------------
The Lightning module and the export ask these functions instead of branching themselves:

* `skipped_loss`: what ``training_step`` returns for a micro-batch whose loss is not finite (on any
  rank: `any_rank`). Without DeepSpeed, None: Lightning skips the backward and AdamW skips every
  parameter without a gradient, so nothing moves. DeepSpeed refuses a None return (Lightning's DeepSpeed
  precision plugin raises), so there the non-finite loss is back-propagated and DeepSpeed's own check
  drops the step (ZeRO-1/2/3 skip any step whose gradient norm is not finite and clear the gradients).
* `gradient_norm` (before the optimizer step; FSDP2's gradients are shards, summed over the ranks) and
  `deepspeed_gradient_norm` (after it: DeepSpeed keeps the gradients inside its engine).
* `gather_state_dict`: the whole state dict on rank 0 (collective under ZeRO-3 and FSDP2; under
  DeepSpeed from the optimizer's fp32 master copies, ``deepspeed.utils.safe_get_full_fp32_param``, so
  no precision is lost).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from collections.abc import Generator, Iterable
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, ModelParallelStrategy, Strategy
from torch import nn

from t3.config import ParallelConfig, StrategyConfig

__all__ = [
    "T3DeepSpeedStrategy",
    "any_rank",
    "build_strategy",
    "deepspeed_config",
    "deepspeed_gradient_norm",
    "fsdp2_parallelize",
    "gather_state_dict",
    "gradient_norm",
    "sequence_parallel_loss_scale",
    "sequence_parallelize",
    "skipped_loss",
]

logger = logging.getLogger(__name__)


class T3DeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's ``DeepSpeedStrategy``, also on the CPU accelerator (gloo), and with optional zero.Init.

    Args:
        zero_init: Construct the model inside ``deepspeed.zero.Init`` under ZeRO-3 (parameters partitioned
            as they are created). Off by default; see the module docstring.
        **kwargs: Passed to ``DeepSpeedStrategy``.
    """

    def __init__(self, *args: Any, zero_init: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.zero_init = zero_init

    def setup_environment(self) -> None:
        # The parent refuses anything but CUDA; DeepSpeed's CPU accelerator works with gloo, so let it through.
        if isinstance(self.accelerator, CPUAccelerator):
            if os.environ.get("DS_ACCELERATOR", "cpu") != "cpu":
                raise RuntimeError(
                    "DeepSpeed on the CPU needs DS_ACCELERATOR=cpu set before deepspeed is imported"
                )
            # Skip only DeepSpeedStrategy's CUDA check; DDPStrategy's set-up calls our setup_distributed.
            DDPStrategy.setup_environment(self)
            return
        super().setup_environment()

    def setup_distributed(self) -> None:
        if isinstance(self.accelerator, CPUAccelerator):
            # The parent first checks that CUDA device indices match local ranks; CPU devices have none.
            reset_seed()
            self.set_world_ranks()
            self._init_deepspeed_distributed()
            return
        super().setup_distributed()

    def _setup_model_and_optimizer(
        self, model: nn.Module, optimizer: Any, lr_scheduler: Any = None
    ) -> tuple[Any, Any]:
        if not isinstance(self.accelerator, CPUAccelerator):
            return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)
        import deepspeed

        # As the parent, except the device rank: it passes the CUDA index of root_device, None on the CPU,
        # which DeepSpeed's engine cannot compare; the local rank is what its CPU accelerator expects.
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank),
            config=self.config,
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, ds_optimizer

    def backward(self, closure_loss: torch.Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        # Lightning's automatic optimisation already divides the loss by accumulate_grad_batches, and
        # DeepSpeed's engine.backward divides by gradient_accumulation_steps again by default, which would
        # scale gradients by 1/accumulate^2 (seen as a DeepSpeed gradient norm 1/accumulate of DDP's):
        # harmless to Adam's direction but it silently weakens gradient clipping.
        kwargs.setdefault("scale_wrt_gas", False)
        return super().backward(closure_loss, optimizer, *args, **kwargs)

    @contextlib.contextmanager
    def model_sharded_context(self) -> Generator[None, None, None]:
        if self.zero_init:
            with super().model_sharded_context():
                yield
        else:
            self._init_config_if_needed()
            yield


def deepspeed_config(cfg: StrategyConfig, *, micro_batch_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict of a ``strategy`` config (Lightning adds precision, clipping, accumulation).

    Args:
        cfg: The strategy config (``zero_stage``, offload flags, bucket size).
        micro_batch_size: Samples per forward per GPU (``train_micro_batch_size_per_gpu``).
    """
    zero: dict[str, Any] = {
        "stage": cfg.zero_stage,
        "contiguous_gradients": True,
        "overlap_comm": True,
        "reduce_scatter": True,
        "allgather_bucket_size": cfg.bucket_size,
        "reduce_bucket_size": cfg.bucket_size,
    }
    if cfg.zero_stage == 3:
        zero.update(
            {
                "stage3_prefetch_bucket_size": cfg.bucket_size,
                "stage3_param_persistence_threshold": 1_000_000,
                # Export gathers the weights itself (t3.training.export); no 16-bit copy in every checkpoint.
                "stage3_gather_16bit_weights_on_model_save": False,
            }
        )
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if cfg.offload_parameters:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "zero_optimization": zero,
        # Our optimizer is torch's AdamW (or DeepSpeedCPUAdam with offload), built in configure_optimizers.
        "zero_allow_untested_optimizer": True,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "steps_per_print": 10**9,  # Lightning logs; keep DeepSpeed's own step printing quiet
        "wall_clock_breakdown": False,
    }


def build_strategy(
    cfg: StrategyConfig, *, accelerator: str, world_size: int, micro_batch_size: int
) -> Strategy | str:
    """A Lightning strategy for the ``strategy`` config.

    Args:
        cfg: The strategy config.
        accelerator: ``gpu`` or ``cpu`` (CPU runs use gloo).
        world_size: Processes that train together (FSDP2's data-parallel size).
        micro_batch_size: Samples per forward per GPU (DeepSpeed's throughput bookkeeping).

    Returns:
        A strategy instance, or ``"auto"`` for one device.
    """
    backend = cfg.process_group_backend or ("gloo" if accelerator == "cpu" else None)
    if cfg.name == "auto":
        return "auto"
    if cfg.name == "ddp":
        return DDPStrategy(process_group_backend=backend, gradient_as_bucket_view=True)
    if cfg.name == "deepspeed":
        if accelerator == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        return T3DeepSpeedStrategy(
            config=deepspeed_config(cfg, micro_batch_size=micro_batch_size),
            process_group_backend=backend,
            logging_level=logging.WARNING,
        )
    if cfg.name == "fsdp2":
        return ModelParallelStrategy(
            data_parallel_size=world_size, tensor_parallel_size=1, process_group_backend=backend
        )
    raise ValueError(f"unknown strategy {cfg.name!r}; expected auto, ddp, deepspeed or fsdp2")


def fsdp2_parallelize(
    model: nn.Module, device_mesh: Any, *, param_dtype: torch.dtype | None = None
) -> nn.Module:
    """Shard a Wan DiT with FSDP2: one ``fully_shard`` unit per block, then the root.

    Per-block units bound the all-gathered memory to one block at a time (plus the root's embeddings and
    head). Parameters stay fp32 in their shards; ``param_dtype`` (bf16 on GPU) is the compute dtype of the
    gathered weights, gradients are reduced in fp32.

    Args:
        model: The DiT (transformed, with the trainable parameters selected).
        device_mesh: Lightning's mesh; its ``data_parallel`` dimension is used.
        param_dtype: Compute dtype of gathered parameters; None keeps fp32.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = device_mesh["data_parallel"]
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def sequence_parallelize(model: nn.Module, cfg: ParallelConfig) -> nn.Module:
    """Shard every sample's video tokens over SP groups of ``cfg.sequence_parallel_size`` ranks.

    Collective (it creates the process groups of `t3.parallel.build_parallel_groups`): every rank calls
    it, after ``torch.distributed`` is initialised. Hooks and attention processors only
    (`t3.parallel.apply_sequence_parallel`): parameters, their names and the state dict are unchanged,
    so checkpoints and exports are those of a run without SP. Size 1 returns the model untouched.

    Args:
        model: The transformed DiT (`t3.transform`), ready for training.
        cfg: The ``parallel`` config.
    """
    from t3.parallel import apply_sequence_parallel, build_parallel_groups

    if cfg.sequence_parallel_size == 1:
        return model
    groups = build_parallel_groups(cfg.sequence_parallel_size)
    logger.info(
        "sequence parallelism: %d SP groups of %d ranks; this rank reads data-parallel stream %d",
        groups.dp_size, groups.sp_size, groups.dp_rank,
    )  # fmt: skip
    return apply_sequence_parallel(
        model, groups.sp_group, align=cfg.align, policy=cfg.policy, max_imbalance=cfg.max_imbalance
    )


def sequence_parallel_loss_scale(world_size: int, sequence_parallel_size: int) -> float:
    """The factor on each rank's loss under sequence parallelism (`t3.parallel.loss`).

    DDP, DeepSpeed ZeRO and FSDP2 as `build_strategy` configures them all sum gradients over every rank
    and divide by the world size, so the rule gives 1: each rank's loss is the sample's loss, as it is.
    """
    from t3.parallel import loss_scale

    return loss_scale(world_size, sequence_parallel_size, gradient_divisor=world_size)


# --- what differs per strategy at run time ----------------------------------------------------------------


def any_rank(strategy: Strategy, flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any rank (one tiny all-reduce): all take one branch."""
    value = torch.tensor(1.0 if flag else 0.0, device=device)
    return bool(strategy.reduce(value, reduce_op="sum") > 0)


def skipped_loss(strategy: Strategy, loss: torch.Tensor) -> torch.Tensor | None:
    """What ``training_step`` returns for a micro-batch whose non-finite loss is skipped (module docstring):
    None, or under DeepSpeed the loss itself, whose non-finite gradient norm makes DeepSpeed drop the step."""
    return loss if isinstance(strategy, DeepSpeedStrategy) else None


def gradient_norm(strategy: Strategy, parameters: Iterable[nn.Parameter]) -> torch.Tensor | None:
    """The global norm of the gradients before the optimizer step (before clipping).

    None under DeepSpeed, whose engine keeps the gradients (`deepspeed_gradient_norm` reads its norm after
    the step), and when no parameter has a gradient (a skipped, non-finite step). FSDP2 gradients are
    DTensor shards over all ranks: the squares are summed locally, then across the ranks (collective).
    """
    if isinstance(strategy, DeepSpeedStrategy):
        return None
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return None
    sharded = hasattr(grads[0], "to_local")
    local = [g.to_local() if sharded else g for g in grads]
    squares = torch.stack([g.detach().float().square().sum() for g in local]).sum()
    if sharded:
        squares = strategy.reduce(squares, reduce_op="sum")
    return squares.sqrt()


def deepspeed_gradient_norm(trainer: L.Trainer) -> float | None:
    """The gradient norm DeepSpeed computed in its last optimizer step; None for other strategies."""
    if not isinstance(trainer.strategy, DeepSpeedStrategy):
        return None
    norm = trainer.model.get_global_grad_norm()
    return None if norm is None else float(norm)


def gather_state_dict(trainer: L.Trainer, dit: nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole state dict of ``dit`` on CPU on global rank 0 (None on other ranks).

    Collective: every rank must call it.
    """
    strategy = trainer.strategy
    if isinstance(strategy, ModelParallelStrategy):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(dit, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if trainer.is_global_zero else None
    if isinstance(strategy, DeepSpeedStrategy):
        return _gather_deepspeed(trainer, dit)
    if not trainer.is_global_zero:
        return None
    return {k: v.detach().to("cpu", copy=True) for k, v in dit.state_dict().items()}


def _gather_deepspeed(trainer: L.Trainer, dit: nn.Module) -> dict[str, torch.Tensor] | None:
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    out: dict[str, torch.Tensor] = {}
    params = dict(dit.named_parameters())
    for name, param in params.items():
        full = safe_get_full_fp32_param(param) if param.requires_grad else None
        if full is None:  # frozen (no master copy) or no ZeRO optimizer mapping: the module's own value
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                full = param.detach()
                if trainer.is_global_zero:
                    full = full.to("cpu", copy=True)
        if trainer.is_global_zero:
            out[name] = full.detach().to("cpu", copy=True)
    if not trainer.is_global_zero:
        return None
    for name, value in dit.state_dict().items():  # persistent buffers, if any
        out.setdefault(name, value.detach().to("cpu", copy=True))
    return out

"""Pieces of the training stack in isolation: LR schedule, data order, LoRA merge, DeepSpeed config."""

from __future__ import annotations

import math

import pytest
import torch

from t3.config import OptimConfig, StrategyConfig
from t3.diffusion import sample_seed
from t3.training.datamodule import StepSampler
from t3.training.finetune import merge_lora_state_dict, select_trainable
from t3.training.optim import build_lr_scheduler, lr_factor
from t3.training.strategies import deepspeed_config


def test_lr_factor_warmup_then_cosine_to_the_floor():
    kw = {"warmup_steps": 4, "schedule": "cosine", "decay_steps": 14, "min_lr_ratio": 0.1}
    assert [lr_factor(s, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, **kw) == 1.0
    assert lr_factor(9, **kw) == pytest.approx(0.55)
    assert lr_factor(14, **kw) == pytest.approx(0.1) and lr_factor(100, **kw) == pytest.approx(0.1)
    assert lr_factor(50, warmup_steps=0, schedule="constant", decay_steps=10, min_lr_ratio=0) == 1.0


def test_lr_scheduler_follows_the_factor_per_optimizer_step():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=1.0)
    sched = build_lr_scheduler(opt, OptimConfig(lr=1.0, warmup_steps=2, schedule="cosine"), max_steps=6)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:2] == [0.5, 1.0] and lrs[2] == 1.0 and lrs[-1] < lrs[2]


def _stream(
    world: int, micro: int, accumulate: int, steps: int, start: int = 0
) -> list[list[tuple[int, int]]]:
    """Per optimizer step, the (position, index) pairs all ranks see together, in rank order."""
    samplers = [
        StepSampler(
            10,
            micro_batch_size=micro,
            accumulate=accumulate,
            rank=r,
            world_size=world,
            seed=3,
            start_step=lambda: start,
        )
        for r in range(world)
    ]
    iters = [iter(s) for s in samplers]
    out = []
    for _ in range(steps):
        step = []
        for it in iters:
            for _ in range(accumulate):
                step += next(it)
        out.append(step)
    return out


def test_step_sampler_global_batch_is_independent_of_the_split():
    one = _stream(world=1, micro=4, accumulate=2, steps=5)
    two = _stream(world=2, micro=2, accumulate=2, steps=5)
    four = _stream(world=4, micro=1, accumulate=2, steps=5)
    assert one == two == four
    positions = [p for step in one for p, _ in step]
    assert positions == list(range(40))
    # Every epoch of 10 positions is a permutation of the data set; epochs differ.
    indices = [i for step in one for _, i in step]
    assert all(sorted(indices[e * 10 : (e + 1) * 10]) == list(range(10)) for e in range(4))
    assert indices[:10] != indices[10:20]


def test_step_sampler_resumes_at_the_step_without_reading_earlier_ones():
    full = _stream(world=2, micro=1, accumulate=2, steps=6)
    assert _stream(world=2, micro=1, accumulate=2, steps=3, start=3) == full[3:]


def test_sample_seed_is_stable_and_distinct():
    assert sample_seed(42, 7) == sample_seed(42, 7)
    assert (
        len({sample_seed(42, p) for p in range(1000)} | {sample_seed(43, 0), sample_seed(42, 0, stream=1)})
        == 1002
    )
    assert 0 <= sample_seed(2**40, 2**40) < 2**63


def test_merge_lora_state_dict_matches_peft():
    from peft.tuners.lora import LoraLayer

    from t3.models.tiny import tiny_dit

    model = tiny_dit()
    select_trainable(
        model,
        "lora",
        lora={"rank": 4, "alpha": 12.0, "dropout": 0.0, "target_modules": ["to_q", "to_out.0", "ffn.net.2"]},
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    merged = merge_lora_state_dict(model.state_dict(), scaling=12.0 / 4)
    plain = tiny_dit().state_dict()
    assert merged.keys() == plain.keys()
    layer = model.blocks[1].attn2.to_out[0]
    assert isinstance(layer, LoraLayer)
    expected = layer.get_base_layer().weight + layer.get_delta_weight("default")
    torch.testing.assert_close(merged["blocks.1.attn2.to_out.0.weight"], expected)
    torch.testing.assert_close(merged["blocks.1.attn2.to_out.0.bias"], layer.get_base_layer().bias)
    assert torch.equal(merged["blocks.1.attn1.to_k.weight"], plain["blocks.1.attn1.to_k.weight"])


def test_select_trainable_attention_is_self_attention_qkvo():
    from t3.models.tiny import tiny_dit

    model = tiny_dit()
    summary = select_trainable(model, "attention")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(".attn1.to_" in n for n in names)
    assert len(names) == 5 * 4 * 2  # 5 blocks x (q, k, v, o) x (weight, bias)
    assert summary.trainable == sum(p.numel() for n, p in model.named_parameters() if n in names)
    with pytest.raises(ValueError, match="unknown trainable mode"):
        select_trainable(model, "norms")


@pytest.mark.parametrize("stage,offload", [(2, False), (3, False), (3, True)])
def test_deepspeed_config(stage, offload):
    cfg = StrategyConfig(
        name="deepspeed", zero_stage=stage, offload_optimizer=offload, offload_parameters=offload
    )
    ds = deepspeed_config(cfg, micro_batch_size=2)
    zero = ds["zero_optimization"]
    assert zero["stage"] == stage and ds["train_micro_batch_size_per_gpu"] == 2
    assert ("offload_optimizer" in zero) == offload and ("offload_param" in zero) == offload
    assert "gradient_accumulation_steps" not in ds  # Lightning sets it from accumulate_grad_batches
    assert math.isfinite(zero["reduce_bucket_size"])


def test_objective_config_builds_the_authors_sampler_and_loss_weight():
    """``objective`` chooses both: the DiffSynth table draw and bell weight, or the continuous shift and MSE."""
    from t3.config import FinetuneConfig, ModelConfig, ObjectiveConfig, ValidationConfig
    from t3.diffusion import BellWeighting, ShiftedDiscreteSampler, ShiftedSampler
    from t3.training.module import T3FinetuneModule

    def module(**objective):
        return T3FinetuneModule(
            model=ModelConfig(preset="tiny", random_init=True), schedule=None, finetune=FinetuneConfig(),
            optim=OptimConfig(), objective=ObjectiveConfig(**objective), validation=ValidationConfig(),
            max_steps=1, seed=0,
        )  # fmt: skip

    authors = module(timestep_sampler="shifted_discrete", loss_weighting="bell", flow_shift=3.0)
    assert authors.sampler == ShiftedDiscreteSampler(shift=3.0, num_timesteps=1000)
    assert authors.weighting == BellWeighting(shift=3.0, num_timesteps=1000, num_train_timesteps=1000)
    plain = module()
    assert plain.sampler == ShiftedSampler(shift=5.0) and plain.weighting is None


def test_stream_loader_sums_the_skips_of_every_worker(tmp_path):
    from torch.utils.data import DataLoader

    from t3.data import build_latent_dataset, write_shards
    from t3.training.datamodule import SkipTally, _Epochs, _StreamLoader

    samples = []
    for i in range(16):
        latents = torch.randn(4, 1, 2, 2)
        if i % 5 == 0:
            latents[0, 0, 0, 0] = float("nan")  # 4 bad samples: 0, 5, 10, 15
        samples.append({"__key__": f"{i:06d}", "latents": latents, "text": torch.randn(3, 8), "caption": "x"})
    write_shards(samples, tmp_path, maxcount=4)
    dataset = build_latent_dataset(tmp_path, batch_size=2, shuffle_shards=False)
    tally = SkipTally()
    loader = DataLoader(_Epochs(dataset), batch_size=None, num_workers=2)
    stream = iter(_StreamLoader(loader, skip_batches=lambda: 0, rank=0, world_size=1, tally=tally))
    batches = [next(stream) for _ in range(12)]  # 6 batches per pass (12 good samples): two passes
    assert all("__skipped__" not in b for b in batches)
    # Each worker reports the skips of a pass after its last batch of it, so the first pass is complete.
    assert tally.skipped["non_finite"] >= 4 and tally.samples == 24


def test_step_timer_leaves_data_loading_out_of_the_step_time(monkeypatch):
    """Lazy one-time work in the data loader (encoding a sample on first read) is not training speed:
    the run's step time is the median of the steps' own work, the wait for data is reported beside it."""
    from types import SimpleNamespace

    import t3.training.callbacks as callbacks
    from t3.training.callbacks import StepTimer

    clock = [0.0]
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: clock[0])
    logged = []
    module = SimpleNamespace(log_dict=lambda metrics, **kw: logged.append(metrics))
    trainer = SimpleNamespace(global_step=0)
    timer = StepTimer(global_batch_size=2, tokens_per_sample=10)
    timer.on_train_start(trainer, module)
    # 6 steps of 2 micro-batches, each micro-batch 0.1 s of work; the first 4 steps wait 2 s per
    # micro-batch for data (encoded lazily on first read), the last 2 steps do not wait.
    for step in range(6):
        for micro in range(2):
            clock[0] += 2.0 if step < 4 else 0.001
            timer.on_train_batch_start(trainer, module, None, 2 * step + micro)
            clock[0] += 0.1
            if micro == 1:
                trainer.global_step += 1
            timer.on_train_batch_end(trainer, module, None, None, 2 * step + micro)
    summary = timer.summary()
    assert summary["perf/step_time_s"] == pytest.approx(0.2)
    assert summary["perf/samples_per_s"] == pytest.approx(10.0)
    assert summary["perf/data_wait_s"] == pytest.approx(4.0)  # the median step still waited: it is said
    assert summary["perf/steps_timed"] == 5
    assert [m["perf/step_time_s"] for m in logged] == pytest.approx([0.2] * 6)
    assert [m["perf/data_wait_s"] for m in logged] == pytest.approx([4.0] * 4 + [0.002] * 2)


def _loaders(world: int, sp: int) -> list[tuple[list[list[int]], list[list[int]]]]:
    """Per rank: the positions of its first 4 training micro-batches and of its validation batches."""
    from types import SimpleNamespace

    from t3.training.datamodule import T3DataModule

    sample = {"latents": torch.zeros(1), "text": torch.zeros(1), "text_mask": torch.ones(1), "caption": ""}
    samples = [sample] * 16
    out = []
    for rank in range(world):
        data = T3DataModule(
            lambda: samples, lambda: samples, micro_batch_size=1, accumulate=2, seed=0,
            val_num_batches=2, sequence_parallel_size=sp,
        )  # fmt: skip
        data.trainer = SimpleNamespace(global_rank=rank, world_size=world, global_step=0)
        data.setup()
        train = iter(data.train_dataloader())
        out.append(
            (
                [next(train)["position"].tolist() for _ in range(4)],
                [b["position"].tolist() for b in data.val_dataloader()],
            )
        )
    return out


def test_ranks_of_a_sequence_parallel_group_read_the_same_samples():
    # 4 processes in SP groups of 2 read what 2 processes without SP read: ranks 2k, 2k + 1 as rank k.
    with_sp, without = _loaders(world=4, sp=2), _loaders(world=2, sp=1)
    assert with_sp == [without[0], without[0], without[1], without[1]]
    assert without[0] != without[1]


def test_skip_counts_are_not_multiplied_by_the_sequence_parallel_size():
    from types import SimpleNamespace

    from t3.training.callbacks import DataSkipMonitor
    from t3.training.datamodule import SkipTally

    tally = SkipTally()
    tally.add({"decode_error": 1}, samples=3)
    # 4 ranks in SP groups of 2, every rank's tally as above: 2 groups, each read 3 samples and skipped 1.
    strategy = SimpleNamespace(reduce=lambda t, reduce_op: t * 4)
    trainer = SimpleNamespace(datamodule=SimpleNamespace(skip_tally=tally), strategy=strategy)
    monitor = DataSkipMonitor(0.5, sequence_parallel_size=2)
    counts = monitor._tally(trainer, SimpleNamespace(device=torch.device("cpu")))
    assert counts["samples"] == 6 and counts["decode_error"] == 2


def test_a_bf16_export_keeps_the_modules_diffusers_keeps_in_fp32(tmp_path):
    """The export casts like loading does (`t3.models.build.cast_state_dict`): norms, the time embedder
    and the modulation table stay float32, so a bf16 export loses no precision that loading would keep."""
    from safetensors.torch import load_file

    from t3.models.tiny import tiny_dit
    from t3.training.export import export_dit

    dit = tiny_dit()
    written = export_dit(dit.state_dict(), dit.config, tmp_path, formats=["diffusers"], dtype="bf16")
    (weights,) = written["diffusers"].glob("*.safetensors")
    dtypes = {name: tensor.dtype for name, tensor in load_file(weights).items()}
    kept = [n for n in dtypes if any(m in n.split(".") for m in type(dit)._keep_in_fp32_modules)]
    assert kept and all(dtypes[n] == torch.float32 for n in kept)
    assert dtypes["blocks.0.attn1.to_q.weight"] == torch.bfloat16

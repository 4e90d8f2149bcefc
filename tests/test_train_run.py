"""End-to-end CPU training of the tiny model: metrics, checkpoints, export, non-finite guard, resume."""

from __future__ import annotations

import csv
import logging
import math
import re
from pathlib import Path

import lightning as L
import pytest
import torch

from t3.training import NonFiniteLossError, train

from .test_configs import compose_train

# 32x32x17 on the tiny model: latents (4, 5, 4, 4), token grid (5, 2, 2); a step takes milliseconds.
TINY = ["data.height=32", "data.width=32", "data.train.num_samples=16", "data.val.num_samples=4"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The tiny model's matrices are far too small for intra-op threads; on a shared 2-core machine the
    threads only contend (these tests run 2-3x faster single-threaded)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """Tiny text encoder and encoded synthetic samples, shared by the runs of this module."""
    return tmp_path_factory.mktemp("t3_cache")


def run_cfg(tmp_path: Path, cache_dir: Path, *overrides: str):
    return compose_train(
        *TINY,
        f"paths.cache_dir={cache_dir}",
        f"run_dir={tmp_path / 'run'}",
        "validation.num_batches=2",
        *overrides,
        root=tmp_path,
    )


def read_metrics(run_dir: Path) -> dict[str, dict[int, float]]:
    """``{metric: {step: value}}`` from the run's CSV files, one per (re)start; later rows win."""
    out: dict[str, dict[int, float]] = {}
    versions = sorted((run_dir / "csv").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    for version in versions:
        with open(version / "metrics.csv") as f:
            for row in csv.DictReader(f):
                for key, value in row.items():
                    if key not in ("step", "epoch") and value != "":
                        out.setdefault(key, {})[int(row["step"])] = float(value)
    return out


def test_train_tiny_cpu_logs_checkpoints_and_exports(tmp_path, cache_dir):
    from t3.models import load_dit

    cfg = run_cfg(
        tmp_path, cache_dir, "trainer.max_steps=3", "validation.every_n_steps=2", "checkpoint.every_n_steps=2"
    )
    metrics, objects = train(cfg)
    run_dir = Path(cfg.run_dir)
    for key in (
        "train/loss",
        "val/loss",
        "val/loss_sigma_0.5",
        "perf/step_time_s",
        "train/grad_norm",
        "train/lr",
    ):
        assert key in metrics and math.isfinite(metrics[key]), key
    logged = read_metrics(run_dir)
    assert sorted(logged["train/loss"]) == [0, 1, 2]
    # The run's speed is the median of steps 1 and 2 (step 0 includes start-up), not the last step's.
    per_step = logged["perf/step_time_s"]
    assert metrics["perf/steps_timed"] == 2
    assert metrics["perf/step_time_s"] == pytest.approx((per_step[1] + per_step[2]) / 2, rel=1e-6)
    assert logged["train/num_skipped_nonfinite"] == {0: 0.0, 1: 0.0, 2: 0.0}
    # last.ckpt links the newest step checkpoint, including the final step off the save interval.
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.is_symlink() and torch.load(last, weights_only=False)["global_step"] == 3
    # The export is the plain (untransformed) DiT with the trained weights, in both formats, and the
    # record of what they were trained with: load_dit applies its schedule.
    from t3.models import read_record
    from t3.summary import read_run_summary
    from t3.transform import schedule_of

    trained = {k: v for k, v in objects["module"].dit.state_dict().items()}
    for fmt in ("diffusers", "wan"):
        exported = load_dit(run_dir / "export" / fmt, preset="tiny", transform=False)
        assert not hasattr(exported.blocks[0].attn1.processor, "schedule")
        for key, value in exported.state_dict().items():
            torch.testing.assert_close(value, trained[key], rtol=0, atol=0)
        record = read_record(run_dir / "export" / fmt)
        assert record.schedule == objects["facts"].schedule and record.schedule.name == "wan21_windows"
        assert (record.model_preset, record.resolution, record.step) == ("tiny", (32, 32, 17), 3)
        assert record.config_digest == read_run_summary(run_dir)["config_digest"]
        assert schedule_of(load_dit(run_dir / "export" / fmt)) == record.schedule
    assert objects["facts"].accumulate == 4  # global batch 4 = micro 1 x 1 process x 4


def test_attention_only_trains_self_attention(tmp_path, cache_dir):
    from t3.models import load_dit
    from t3.models.tiny import tiny_dit

    cfg = run_cfg(
        tmp_path,
        cache_dir,
        "trainer.max_steps=2",
        "finetune.trainable=attention",
        "finetune.offload_activations=true",  # saved block inputs go through save_on_cpu
        "validation.every_n_steps=0",
    )
    train(cfg)
    before = tiny_dit(seed=0).state_dict()
    after = load_dit(Path(cfg.run_dir) / "export" / "diffusers").state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".attn1.to_" in k for k in changed), sorted(changed)[:5]


def test_lora_trains_adapters_and_exports_them_merged(tmp_path, cache_dir):
    from t3.models import load_dit

    cfg = run_cfg(
        tmp_path,
        cache_dir,
        "trainer.max_steps=2",
        "finetune.trainable=lora",
        "finetune.lora.rank=4",
        "finetune.lora.alpha=8",
        "optim.lr=1e-2",
        "validation.every_n_steps=0",
    )
    _, objects = train(cfg)
    module = objects["module"]
    assert all(("lora_" in n) == p.requires_grad for n, p in module.dit.named_parameters())
    exported = load_dit(Path(cfg.run_dir) / "export" / "diffusers")
    # Same function: the merged export equals the adapted model on a random input.
    torch.manual_seed(0)
    x = torch.randn(1, 4, 5, 4, 4)
    t = torch.tensor([500.0])
    text = torch.randn(1, 7, 16)
    import t3

    t3.transform(exported, module.schedule)
    module.dit.eval()
    with torch.no_grad():
        expected = module.dit(x, t, text, return_dict=False)[0]
        got = exported(x, t, text, return_dict=False)[0]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    # The adapters learned something, and it is in the exported weight.
    base = module.dit.blocks[0].attn1.to_q.base_layer.weight
    assert not torch.equal(exported.blocks[0].attn1.to_q.weight, base)


class _NaNAt(L.Callback):
    """Make the DiT output NaN for the given batch indices (batch_idx counts micro-batches)."""

    def __init__(self, batches: set[int]) -> None:
        self.batches = batches
        self.snapshots: dict[int, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = {}
        self._before: dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._before = {k: v.detach().clone() for k, v in pl_module.dit.state_dict().items()}
        if batch_idx in self.batches:
            real = pl_module._model_fn.__func__

            def nan_fn(self_, *args, **kwargs):
                return real(self_, *args, **kwargs) * float("nan")

            pl_module._model_fn = nan_fn.__get__(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx in self.batches:
            del pl_module._model_fn  # back to the class method
            after = {k: v.detach().clone() for k, v in pl_module.dit.state_dict().items()}
            self.snapshots[batch_idx] = (self._before, after)


def test_nonfinite_loss_skips_the_step_and_counts_it(tmp_path, cache_dir):
    # Global batch 2 = micro 2: one micro-batch per step, so a bad batch is a whole skipped step.
    guard = _NaNAt({1, 3})
    cfg = run_cfg(
        tmp_path,
        cache_dir,
        "trainer.max_steps=5",
        "batch.global_size=2",
        "batch.micro_size=2",
        "validation.every_n_steps=0",
    )
    train(cfg, callbacks=[guard])
    for before, after in guard.snapshots.values():
        assert all(torch.equal(before[k], after[k]) for k in before), "a non-finite step moved the weights"
    logged = read_metrics(Path(cfg.run_dir))
    assert logged["train/num_skipped_nonfinite"] == {0: 0.0, 1: 1.0, 2: 1.0, 3: 2.0, 4: 2.0}
    assert math.isnan(logged["train/loss"][1]) and math.isfinite(logged["train/loss"][2])


def test_consecutive_nonfinite_losses_stop_with_a_clear_message(tmp_path, cache_dir):
    cfg = run_cfg(
        tmp_path,
        cache_dir,
        "trainer.max_steps=10",
        "batch.global_size=2",
        "batch.micro_size=2",
        "validation.every_n_steps=0",
        "max_consecutive_bad_steps=3",
    )
    with pytest.raises(NonFiniteLossError, match="3 consecutive micro-batches had a non-finite loss"):
        train(cfg, callbacks=[_NaNAt({2, 3, 4, 5, 6})])


class _Crash(L.Callback):
    """Kill the run (an exception, as a node failure would) at micro-batch ``batch_idx``."""

    def __init__(self, batch_idx: int) -> None:
        self.batch_idx = batch_idx

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.batch_idx:
            raise RuntimeError("simulated kill")


def test_resume_continues_bit_identically(tmp_path, cache_dir):
    common = (
        # The paper recipe's objective: a stateless table draw and weight, so per-sample seeding holds.
        "objective.timestep_sampler=shifted_discrete",
        "objective.loss_weighting=bell",
        "trainer.max_steps=6",
        "batch.global_size=4",
        "batch.micro_size=2",  # 2 micro-batches per step
        "checkpoint.every_n_steps=1",
        "validation.every_n_steps=3",
        "optim.schedule=cosine",
        "optim.warmup_steps=2",
        "optim.lr=1e-3",
    )
    straight = run_cfg(tmp_path / "a", cache_dir, *common)
    train(straight)

    resumed = run_cfg(tmp_path / "b", cache_dir, *common)
    # Killed in the middle of step 4 (micro-batch 7); last.ckpt holds step 3.
    with pytest.raises(RuntimeError, match="simulated kill"):
        train(resumed, callbacks=[_Crash(batch_idx=7)])
    assert (
        torch.load(Path(resumed.run_dir) / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
        == 3
    )
    train(resumed)  # the same command again

    with open(Path(resumed.run_dir) / "csv" / "version_1" / "metrics.csv") as f:  # the second start
        assert {int(r["step"]) for r in csv.DictReader(f) if r["train/loss"]} == {3, 4, 5}
    a, b = read_metrics(Path(straight.run_dir)), read_metrics(Path(resumed.run_dir))
    assert sorted(a["train/loss"]) == sorted(b["train/loss"]) == list(range(6))
    assert a["train/loss"] == b["train/loss"]  # bit-identical, float for float
    assert a["val/loss"] == b["val/loss"]
    assert a["train/lr"] == b["train/lr"]
    wa = torch.load(Path(straight.run_dir) / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    wb = torch.load(Path(resumed.run_dir) / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_ema_is_checkpointed_and_exported(tmp_path, cache_dir):
    from t3.models import load_dit

    cfg = run_cfg(
        tmp_path,
        cache_dir,
        "trainer.max_steps=3",
        "ema.enabled=true",
        "ema.decay=0.5",
        "validation.every_n_steps=0",
        "optim.lr=1e-2",
    )
    _, objects = train(cfg)
    run_dir = Path(cfg.run_dir)
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["callbacks"]
    shadow = next(v for k, v in state.items() if k.startswith("EMACallback"))["shadow"]
    ema = load_dit(run_dir / "export_ema" / "diffusers").state_dict()
    raw = load_dit(run_dir / "export" / "diffusers").state_dict()
    key = "blocks.0.attn1.to_q.weight"
    torch.testing.assert_close(ema[key], shadow[key])
    assert not torch.equal(ema[key], raw[key])


def test_sample_videos_are_written_at_validation(tmp_path, cache_dir):
    pytest.importorskip("av")
    from t3.video_io import read_video

    cfg = run_cfg(
        tmp_path,
        cache_dir,
        "trainer.max_steps=2",
        "validation.every_n_steps=2",
        "validation.num_batches=1",
        "validation.sample_videos.enabled=true",
        "validation.sample_videos.num_steps=2",
        "validation.sample_videos.prompts=[a red circle moving left]",
        "export.formats=[]",
    )
    train(cfg)
    videos = sorted((Path(cfg.run_dir) / "samples").glob("step_*/*.mp4"))
    assert [v.parent.name for v in videos] == ["step_0000002"]
    assert read_video(videos[0]).shape == (17, 32, 32, 3)


def test_latent_shards_stream_trains_and_resumes_identically(tmp_path, cache_dir):
    from t3.data import write_shards
    from t3.data.factories import synthetic_latents

    samples = synthetic_latents(
        24, height=32, width=32, num_frames=17, seed=5, model={"preset": "tiny"}, cache_dir=str(cache_dir)
    )
    write_shards((samples[i] for i in range(16)), tmp_path / "train", maxcount=4)
    write_shards((samples[i] for i in range(16, 24)), tmp_path / "val", maxcount=4)
    common = (
        "data=latent_shards",
        "data.height=32",
        "data.width=32",
        "data.num_frames=17",
        "data.num_workers=0",
        f"data.train.urls_or_dir={tmp_path / 'train'}",
        f"data.val.urls_or_dir={tmp_path / 'val'}",
        "data.train.shuffle_buffer=4",
        "batch.global_size=4",
        "batch.micro_size=2",
        "trainer.max_steps=6",  # 16 samples = 4 steps per epoch: crosses an epoch boundary
        "validation.every_n_steps=3",
        "checkpoint.every_n_steps=1",
        "optim.lr=1e-3",
    )
    straight = compose_train(
        *common, f"paths.cache_dir={cache_dir}", f"run_dir={tmp_path / 'a'}", root=tmp_path
    )
    train(straight)
    resumed = compose_train(
        *common, f"paths.cache_dir={cache_dir}", f"run_dir={tmp_path / 'b'}", root=tmp_path
    )
    with pytest.raises(RuntimeError, match="simulated kill"):
        train(resumed, callbacks=[_Crash(batch_idx=10)])
    train(resumed)
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert sorted(a["train/loss"]) == list(range(6)) and a["train/loss"] == b["train/loss"]
    assert a["val/loss"] == b["val/loss"] and len(a["val/loss"]) == 2


def test_raw_videos_are_prepared_once_then_trained_on(tmp_path, cache_dir):
    pytest.importorskip("av")
    from t3.data import synthetic_video
    from t3.video_io import write_video

    videos = tmp_path / "videos"
    videos.mkdir()
    rows = ["path,caption"]
    for i in range(4):
        frames, caption = synthetic_video(i, frames=20, height=48, width=48, seed=9)
        write_video(videos / f"clip{i}.mp4", frames, fps=16)
        rows.append(f"clip{i}.mp4,{caption}")
    (videos / "list.csv").write_text("\n".join(rows) + "\n")
    cfg = compose_train(
        f"paths.cache_dir={cache_dir}",
        f"run_dir={tmp_path / 'run'}",
        "data=raw_videos",
        "data.height=32",
        "data.width=32",
        "data.num_frames=17",
        "data.num_workers=0",
        f"data.prepare.video_list={videos / 'list.csv'}",
        "data.prepare.fps=null",
        "data.train.shuffle_buffer=0",
        "batch.global_size=2",
        "batch.micro_size=2",
        "trainer.max_steps=2",
        "validation.every_n_steps=0",
        "export.formats=[]",
        root=tmp_path,
    )
    metrics, _ = train(cfg)
    shards = sorted(Path(cfg.data.prepare.out_dir).glob("shard-*.tar"))
    assert shards and math.isfinite(metrics["train/loss"])


def _shard_set(tmp_path: Path, cache_dir: Path, bad: dict[str, torch.Tensor]) -> Path:
    """12 good synthetic samples (32x32x17 on the tiny model) and the given bad latents, 5 per shard."""
    from t3.data import write_shards
    from t3.data.factories import synthetic_latents

    samples = synthetic_latents(
        12, height=32, width=32, num_frames=17, seed=5, model={"preset": "tiny"}, cache_dir=str(cache_dir)
    )
    good = [samples[i] for i in range(12)]
    broken = [
        dict(good[i], __key__=f"bad{name}", latents=latents) for i, (name, latents) in enumerate(bad.items())
    ]
    items = [*broken, *good]
    write_shards(items, tmp_path / "shards", maxcount=5)
    return tmp_path / "shards"


def test_a_sample_the_model_cannot_take_is_skipped_not_fatal(tmp_path, cache_dir):
    # A [4, 5, 80, 80] sample gives a 40x40 token grid on the tiny DiT (its RoPE covers 32 per axis), and an
    # off-size [4, 5, 4, 6] one would be trained on silently: both are skipped. Two of each, so that they
    # would fill a bucket (a batch of 2) of their own.
    bad = {"huge": torch.randn(4, 5, 80, 80), "wide": torch.randn(4, 5, 4, 6)}
    shards = _shard_set(tmp_path, cache_dir, {**bad, **{f"{k}2": v for k, v in bad.items()}})
    cfg = compose_train(
        "data=latent_shards",
        "data.height=32",
        "data.width=32",
        "data.num_frames=17",
        "data.num_workers=0",
        f"data.train.urls_or_dir={shards}",
        "data.train.shuffle_buffer=0",
        "batch.global_size=2",
        "batch.micro_size=2",
        "trainer.max_steps=6",  # 12 good samples = 6 steps: the whole set
        "data.max_skipped_fraction=null",  # a quarter of this set is bad
        "validation.every_n_steps=0",
        "export.formats=[]",
        f"paths.cache_dir={cache_dir}",
        f"run_dir={tmp_path / 'run'}",
        root=tmp_path,
    )
    metrics, _ = train(cfg)
    assert math.isfinite(metrics["train/loss"])


def _nan_latents() -> torch.Tensor:
    latents = torch.randn(4, 5, 4, 4)
    latents[0, 0, 0, 0] = float("nan")
    return latents


def _skipping_run(tmp_path: Path, cache_dir: Path, *overrides: str):
    bad = {"huge": torch.randn(4, 5, 80, 80), "huge2": torch.randn(4, 5, 80, 80), "nan": _nan_latents()}
    shards = _shard_set(tmp_path, cache_dir, {**bad, "nan2": _nan_latents()})
    return compose_train(
        "data=latent_shards",
        "data.height=32",
        "data.width=32",
        "data.num_frames=17",
        "data.num_workers=2",  # the counts of both workers are summed
        f"data.train.urls_or_dir={shards}",
        "data.train.shuffle_buffer=0",
        "batch.global_size=2",
        "batch.micro_size=2",
        "trainer.max_steps=6",  # 12 good samples: every batch of the first pass
        "validation.every_n_steps=0",
        "export.formats=[]",
        f"paths.cache_dir={cache_dir}",
        f"run_dir={tmp_path / 'run'}",
        *overrides,
        root=tmp_path,
    )


def test_skipped_samples_are_counted_in_the_metrics_and_the_summary(tmp_path, cache_dir):
    from t3.summary import read_run_summary

    cfg = _skipping_run(tmp_path, cache_dir, "data.max_skipped_fraction=0.5")
    metrics, _ = train(cfg)
    expected = {"data/skipped": 4.0, "data/skipped_bad_shape": 2.0, "data/skipped_non_finite": 2.0}
    assert {k: metrics[k] for k in expected} == expected
    # Skipped over skipped plus read samples (the trainer reads a batch ahead: 12 or 14 samples by the end).
    assert 4 / 18 <= metrics["data/skipped_fraction"] <= 4 / 16
    logged = read_metrics(Path(cfg.run_dir))
    assert logged["data/skipped"][5] == 4.0  # in metrics.csv, per step
    summary = read_run_summary(cfg.run_dir)
    assert summary["status"] == "completed"
    assert {k: summary["metrics"][k] for k in expected} == expected


def test_too_many_skipped_samples_stop_the_run_with_a_clear_error(tmp_path, cache_dir):
    from t3.summary import read_run_summary
    from t3.training.callbacks import DataSkipError

    cfg = _skipping_run(tmp_path, cache_dir, "data.max_skipped_fraction=0.1")
    words = r"% of the training data was skipped \(4 of 1\d items: bad_shape=2, non_finite=2\), more than data.max_skipped_fraction=0.1"
    with pytest.raises(DataSkipError, match=words) as info:
        train(cfg)
    assert "\n" not in str(info.value)
    summary = read_run_summary(cfg.run_dir)
    assert summary["status"] == "failed" and "max_skipped_fraction" in summary["error"]


def test_resume_falls_back_past_a_truncated_or_corrupted_checkpoint(tmp_path, cache_dir, caplog):
    common = (
        "batch.global_size=2",
        "batch.micro_size=2",
        "checkpoint.every_n_steps=1",  # and checkpoint.keep=2 (the default)
        "validation.every_n_steps=0",
        "export.formats=[]",
        "optim.lr=1e-3",
    )
    straight = run_cfg(tmp_path / "a", cache_dir, *common, "trainer.max_steps=6")
    train(straight)

    def rerun(steps: int):
        return train(run_cfg(tmp_path / "b", cache_dir, *common, f"trainer.max_steps={steps}"))

    rerun(4)
    checkpoints = tmp_path / "b" / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step=*")) == [
        "step=0000003.ckpt", "step=0000003.ckpt.sha256.json", "step=0000004.ckpt", "step=0000004.ckpt.sha256.json",
    ]  # fmt: skip
    last = (checkpoints / "last.ckpt").resolve()
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # killed while writing, say
    with caplog.at_level(logging.WARNING):
        rerun(5)  # resumes from step 3
    assert "step=0000004.ckpt is not usable: step=0000004.ckpt has sha256" in caplog.text

    newest = (checkpoints / "last.ckpt").resolve()
    assert newest.name == "step=0000005.ckpt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 3] ^= 0x01  # one flipped bit, the file still loads
    newest.write_bytes(bytes(data))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        rerun(6)  # resumes from step 4
    assert "step=0000005.ckpt is not usable" in caplog.text
    assert sorted(p.name for p in (checkpoints / "damaged").iterdir() if p.suffix == ".ckpt") == [
        "step=0000004.ckpt", "step=0000005.ckpt",
    ]  # fmt: skip
    a, b = read_metrics(Path(straight.run_dir)), read_metrics(tmp_path / "b" / "run")
    assert sorted(b["train/loss"]) == list(range(6)) and a["train/loss"] == b["train/loss"]


def test_changed_settings_are_refused_and_resume_false_starts_clean(tmp_path, cache_dir):
    from t3.config import ConfigError
    from t3.summary import read_run_summary

    common = ("trainer.max_steps=2", "validation.every_n_steps=0", "export.formats=[]")
    train(run_cfg(tmp_path, cache_dir, *common))  # run A
    run_dir = tmp_path / "run"
    a_checkpoint = (run_dir / "checkpoints" / "last.ckpt").resolve().read_bytes()

    # The same folder with another learning rate: refused in one line naming the change; A's summary stays.
    with pytest.raises(ConfigError) as info:
        train(run_cfg(tmp_path, cache_dir, *common, "optim.lr=1e-3"))
    assert "optim.lr: 2e-05 -> 0.001" in str(info.value) and "\n" not in str(info.value)
    assert read_run_summary(run_dir)["status"] == "completed"

    # resume=false: run B starts clean; A's outputs are kept in previous_runs/<time>/.
    train(run_cfg(tmp_path, cache_dir, *common, "optim.lr=1e-3", "resume=false"))
    (previous,) = (run_dir / "previous_runs").iterdir()
    assert (previous / "checkpoints" / "step=0000002.ckpt").read_bytes() == a_checkpoint
    assert (previous / "summary.json").is_file() and (
        previous / "csv" / "version_0" / "metrics.csv"
    ).is_file()
    assert [p.name for p in (run_dir / "csv").iterdir()] == ["version_0"]  # B's log only
    assert (run_dir / "checkpoints" / "last.ckpt").resolve().read_bytes() != a_checkpoint

    # Rerunning B (longer) resumes B, not A.
    train(
        run_cfg(
            tmp_path,
            cache_dir,
            "trainer.max_steps=3",
            "validation.every_n_steps=0",
            "export.formats=[]",
            "optim.lr=1e-3",
        )
    )
    with open(run_dir / "csv" / "version_1" / "metrics.csv") as f:
        assert {int(r["step"]) for r in csv.DictReader(f) if r["train/loss"]} == {2}

    # An explicit resume_changed_config=true continues B with other settings.
    train(
        run_cfg(
            tmp_path,
            cache_dir,
            "trainer.max_steps=4",
            "validation.every_n_steps=0",
            "export.formats=[]",
            "optim.lr=2e-3",
            "resume_changed_config=true",
        )
    )
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4


@pytest.mark.parametrize(
    ("devices", "sp", "words"),
    [
        (
            2,
            3,
            "parallel.sequence_parallel_size=3 does not divide the world size 2 (accepted: a divisor of 2: 1, 2)",
        ),
        (
            1,
            2,
            "parallel.sequence_parallel_size=2 does not divide the world size 1 (accepted: a divisor of 1: 1)",
        ),
    ],
)
def test_sequence_parallel_size_not_dividing_the_world_stops_training_before_any_model(
    devices, sp, words, tmp_path, cache_dir, monkeypatch
):
    from t3.config import ConfigError

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr("t3.training.module.build_dit", no_model)
    cfg = run_cfg(
        tmp_path,
        cache_dir,
        f"trainer.devices={devices}",
        "strategy=ddp",
        f"parallel.sequence_parallel_size={sp}",
    )
    with pytest.raises(ConfigError) as error:
        train(cfg)
    assert str(error.value) == words
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_failed_run_summary_keeps_the_root_cause(tmp_path, cache_dir):
    from t3.summary import read_run_summary

    cfg = run_cfg(tmp_path, cache_dir, "data.train.num_samples=0", "trainer.max_steps=1")
    with pytest.raises(Exception):  # noqa: B017 - Hydra wraps the reader's error; the summary must not
        train(cfg)
    summary = read_run_summary(tmp_path / "run")
    assert summary["status"] == "failed"
    # One line, naming what went wrong (the reader's message) first, then Hydra's wrapper.
    assert summary["error"].startswith("ValueError: num_samples must be >= 1, got 0 (raised as Instantiation")
    assert "\n" not in summary["error"]


def test_rerunning_a_finished_run_keeps_its_results(tmp_path, cache_dir, caplog):
    from t3.report import collect, rows
    from t3.summary import read_run_summary

    caplog.set_level(logging.INFO)
    cfg = run_cfg(tmp_path, cache_dir, "trainer.max_steps=2", "validation.every_n_steps=2")
    train(cfg)
    first = read_run_summary(cfg.run_dir)
    assert first["metrics"]["val/loss"] is not None and first["speed"]["perf/step_time_s"] > 0
    # Cost beside speed: T3's self-attention MACs, below dense attention's over the tiny model's 5 layers
    # (2 heads x 12 channels) on the (5, 2, 2) token grid.
    assert 0 < first["speed"]["macs/self_attention"] < 5 * 2 * 20 * 20 * 2 * 12
    assert "litlogger" not in caplog.text and "was configured so" not in caplog.text  # Lightning's noise
    metrics, _ = train(cfg)  # the same command again: nothing left to train
    again = read_run_summary(cfg.run_dir)
    assert again["status"] == "completed"
    assert again["metrics"] == first["metrics"] and again["speed"] == first["speed"]
    assert again["step"] == first["step"] == 2
    assert metrics["val/loss"] == first["metrics"]["val/loss"]
    header, table = rows(collect(tmp_path))
    assert table[0][header.index("val/loss")] == first["metrics"]["val/loss"]
    # Trained further, the run's results are its own again: the earlier ones are not mixed in.
    more = run_cfg(tmp_path, cache_dir, "trainer.max_steps=3", "validation.every_n_steps=2")
    train(more)
    last = read_run_summary(cfg.run_dir)
    assert last["step"] == 3 and "val/loss" not in last["metrics"] and last["speed"]["perf/steps_timed"] == 1


def test_training_logs_progress_lines_to_train_log(tmp_path, cache_dir, capsys):
    """A SLURM .out or a tail -f of train.log shows step, loss, lr, s/step and ETA while training runs."""
    cfg = run_cfg(
        tmp_path, cache_dir, "trainer.max_steps=5", "progress_every_n_steps=2", "validation.every_n_steps=0"
    )
    train(cfg)
    assert "step/s" not in capsys.readouterr().err  # not a terminal: plain lines only, no bar
    log = (Path(cfg.run_dir) / "train.log").read_text()
    lines = [line for line in log.splitlines() if "] - step " in line]
    # The first step of the process, every second step, and the last step.
    assert [line.split("] - step ")[1].split(" ")[0] for line in lines] == ["1/5", "2/5", "4/5", "5/5"]
    pattern = (
        r"\] - step 4/5 \(80\.0%\) \| loss \d+\.\d{4} \| lr \d\.\d\de-\d\d \| \d+\.\d\d s/step \| ETA \d+s$"
    )
    assert re.search(pattern, lines[2]), lines[2]
    assert lines[-1].endswith("ETA 0s")


def test_training_shows_a_progress_bar_on_a_terminal(tmp_path, cache_dir, monkeypatch):
    import io
    import sys

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    train(run_cfg(tmp_path, cache_dir, "trainer.max_steps=3", "validation.every_n_steps=0"))
    assert "3/3 [" in terminal.getvalue() and "step/s" in terminal.getvalue()

"""The embedded demo (``python train.py``, experiment ``demo``): the T3 story in miniature on a CPU.

T3 takes a video DiT pretrained with full attention at a low resolution, swaps its self-attention for
multi-scale window attention and fine-tunes it at a higher resolution, where full attention is what makes
inference expensive. `run_demo` replays that on the tiny Wan DiT and procedural moving-shape videos:

1. **Pretrain** with dense attention at ``demo.pretrain.{height,width}`` (64x64x17). The run lives in
   ``${paths.cache_dir}/demo/pretrain-<key>``, ``<key>`` a hash of every setting that changes the
   weights, so later runs reuse it (and an interrupted one resumes from its checkpoint).
2. **Apply T3 and fine-tune** at ``data.{height,width}`` (128x192x17) with the ``t3`` schedule of the
   config, starting from the pretrained export (``model.init_from``). Both stages are ordinary
   `t3.training.train` runs on configs derived from the demo's own.
3. **Evaluate** at the fine-tune resolution, on the held-out set ``data.val`` (other videos than any
   training set), three models:

   * ``dense``: pretrained weights, full attention (the untransformed model);
   * ``t3_before_ft``: pretrained weights, T3 attention;
   * ``t3_after_ft``: fine-tuned weights, T3 attention.

   Metrics, all measured in this run:

   * held-out flow-matching loss at the fixed noise levels ``validation.sigmas`` with fixed noise (the
     recipe of the training module's validation, so the fine-tune's last ``val/loss`` equals the
     ``t3_after_ft`` value);
   * ``fd_latent_rand3d``: Fréchet distance between generated latents and the held-out latents, on the
     features of a fixed, seeded, *random* 3D-conv network (`RandomConv3dFeatures`). It is **not**
     I3D-FVD: the tiny VAE is random, so decoded pixels carry no meaning, and a random network is the
     only extractor available offline. Useful for comparing the three models with each other only;
     the distance between the fine-tune training set and the held-out set is reported as its floor;
   * ``hf_energy_ratio``: high-frequency energy (squared neighbour differences) of the generated latents
     over that of the held-out latents: residual noise in the samples, the paper's symptom of T3 without
     fine-tuning;
   * DiT step latency (one forward, batch 1) of dense vs T3, interleaved call by call, median of a few,
     at the fine-tune size and at ``demo.eval.latency_scale`` times it, with the device named;
   * self-attention and whole-forward MACs of dense vs T3 (`t3.attention.flops`).

4. **Write** ``results.md``, ``results.json``, ``demo.png`` (training curves and the comparison) and
   ``videos/`` to ``run_dir`` (``outputs/demo``). The videos are *latent visualisations*: the first three
   latent channels as RGB, panels held-out | dense | T3 before | T3 after, plus the held-out pixel video
   whose caption conditioned them. Decoded videos are not written: the tiny VAE is untrained, so its
   decoder turns any latent into noise.

``demo.fast=true`` applies `FAST_OVERRIDES`: every stage in miniature, for the smoke test.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import hashlib
import json
import logging
import math
import shutil
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn
from tqdm import tqdm

__all__ = [
    "FAST_OVERRIDES",
    "MODEL_NAMES",
    "DemoConfig",
    "DemoEvalConfig",
    "DemoPretrainConfig",
    "RandomConv3dFeatures",
    "demo_settings",
    "pretrain_config",
    "pretrain_key",
    "run_demo",
]

logger = logging.getLogger(__name__)

#: The three models compared, in table order, with how they are labelled.
MODEL_NAMES: dict[str, str] = {
    "dense": "dense (pretrained weights, full attention)",
    "t3_before_ft": "T3 before fine-tuning (pretrained weights)",
    "t3_after_ft": "T3 after fine-tuning (fine-tuned weights)",
}

#: Name of the Fréchet distance reported by the demo (never to be confused with I3D-FVD).
FD_NAME = "fd_latent_rand3d"

#: ``demo.fast=true``: dotted keys replaced for a smoke run of every stage (grids (5, 2, 2) -> (5, 4, 8)).
FAST_OVERRIDES: dict[str, Any] = {
    "data.height": 64,
    "data.width": 128,
    "data.train.num_samples": 4,
    "data.val.num_samples": 4,
    "trainer.max_steps": 3,
    "validation.every_n_steps": 3,
    "validation.num_batches": 1,
    "checkpoint.every_n_steps": 3,
    "demo.pretrain.height": 32,
    "demo.pretrain.width": 32,
    "demo.pretrain.steps": 4,
    "demo.pretrain.num_samples": 4,
    "demo.pretrain.val_samples": 4,
    "demo.pretrain.val_every": 2,
    "demo.eval.sample_steps": 2,
    "demo.eval.num_videos": 1,
    "demo.eval.latency_repeats": 1,
}

# Bump when the pretraining recipe changes in a way the settings below do not capture.
_PRETRAIN_RECIPE_VERSION = 1

# Full attention everywhere, as conf/t3/dense.yaml: the pretraining schedule.
_DENSE_SCHEDULE: dict[str, Any] = {
    "_target_": "t3.attention.build_schedule",
    "name": "dense",
    "pieces": [[1, 1, 1]],
    "branches": ["local", "dilated"],
    "share_identical_branches": True,
    "description": "full attention in every layer (baseline)",
}


# --- settings ---------------------------------------------------------------------------------------------


@dataclass
class DemoPretrainConfig:
    """Stage 1: dense pretraining at a low resolution (``demo.pretrain``).

    Attributes:
        height: Frame height in pixels.
        width: Frame width in pixels.
        steps: Optimizer steps.
        lr: Peak learning rate (the rest of ``optim`` is shared with the fine-tune).
        num_samples: Synthetic training videos.
        val_samples: Low-resolution held-out videos (for the pretraining curve only).
        val_every: Validate every this many steps (0: never).
    """

    height: int = 64
    width: int = 64
    steps: int = 800
    lr: float = 1e-3
    num_samples: int = 128
    val_samples: int = 16
    val_every: int = 100


@dataclass
class DemoEvalConfig:
    """Stage 3: the comparison at the fine-tune resolution (``demo.eval``).

    Attributes:
        sample_steps: Euler steps of the generated latents.
        sample_seed: Generated sample ``i`` starts from the noise of seed ``sample_seed + i`` for every model.
        num_videos: Latent-visualisation videos written.
        latency_repeats: Timed forwards per model and size; the median is reported.
        latency_scale: Latency is also measured at ``latency_scale`` times the height and width.
        fd_width: Channels of the random feature network (``2 * fd_width`` features).
        fd_seed: Seed of the random feature network.
    """

    sample_steps: int = 20
    sample_seed: int = 0
    num_videos: int = 3
    latency_repeats: int = 5
    latency_scale: int = 2
    fd_width: int = 32
    fd_seed: int = 0


@dataclass
class DemoConfig:
    """The ``demo`` node of ``conf/experiment/demo.yaml``.

    Attributes:
        fast: Apply `FAST_OVERRIDES` (a smoke run of every stage).
        num_threads: ``torch.set_num_threads`` for the run (restored afterwards); None keeps the default.
        pretrain: Stage-1 settings.
        eval: Stage-3 settings.
    """

    fast: bool = False
    num_threads: int | None = 1
    pretrain: DemoPretrainConfig = field(default_factory=DemoPretrainConfig)
    eval: DemoEvalConfig = field(default_factory=DemoEvalConfig)


def demo_settings(cfg: DictConfig) -> tuple[DictConfig, DemoConfig]:
    """The config the demo runs on (``demo.fast`` applied) and its typed ``demo`` node.

    Args:
        cfg: The composed training config with a ``demo`` node (``experiment=demo``).

    Returns:
        ``(cfg, demo)``: a copy of ``cfg`` with the fast overrides applied if asked for, and the ``demo``
        node checked against `DemoConfig` (a misspelt key fails here, naming it).
    """
    cfg = copy.deepcopy(cfg)
    if cfg.get("demo") is not None and cfg.demo.get("fast", False):
        with open_dict(cfg):
            for key, value in FAST_OVERRIDES.items():
                OmegaConf.update(cfg, key, value, merge=False)
    node = OmegaConf.merge(OmegaConf.structured(DemoConfig), cfg.get("demo") or {})
    demo = OmegaConf.to_object(node)
    assert isinstance(demo, DemoConfig)
    return cfg, demo


# --- stage configs ----------------------------------------------------------------------------------------


def _derive(cfg: DictConfig, overrides: Mapping[str, Any]) -> DictConfig:
    """A copy of ``cfg`` with dotted ``overrides``; interpolations (``${data.height}`` ...) stay live."""
    out = copy.deepcopy(cfg)
    with open_dict(out):
        for key, value in overrides.items():
            OmegaConf.update(out, key, value, merge=False)
    return out


def pretrain_key(cfg: DictConfig, demo: DemoConfig) -> str:
    """Hash of every setting that changes the pretrained weights: the name of the pretraining cache entry.

    Paths, logging, checkpoint and validation settings are left out: they do not change the weights.
    """
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(resolved, dict)
    settings = {
        "recipe": _PRETRAIN_RECIPE_VERSION,
        "pretrain": {k: v for k, v in asdict(demo.pretrain).items() if k not in ("val_samples", "val_every")},
        "num_frames": resolved["data"]["num_frames"],
        "model": {
            k: resolved["model"][k]
            for k in ("preset", "seed", "attention_backend", "vae_path", "text_encoder_path")
        },
        "seed": resolved["seed"],
        "batch": resolved["batch"],
        "optim": {k: v for k, v in resolved["optim"].items() if k != "lr"},
        "objective": resolved["objective"],
        "finetune": {k: resolved["finetune"][k] for k in ("trainable", "gradient_checkpointing")},
        "trainer": {k: resolved["trainer"][k] for k in ("precision", "gradient_clip_val")},
    }
    blob = json.dumps(settings, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def pretrain_config(cfg: DictConfig, demo: DemoConfig) -> DictConfig:
    """Stage 1's training config: the demo's, at the pretraining size, dense, from random weights."""
    pre = demo.pretrain
    micro = int(cfg.batch.micro_size)
    run_dir = Path(cfg.paths.cache_dir) / "demo" / f"pretrain-{pretrain_key(cfg, demo)}"
    return _derive(
        cfg,
        {
            "experiment_name": "demo_pretrain",
            "run_dir": str(run_dir),
            "resume": True,  # an interrupted pretraining continues from its last checkpoint
            "t3": dict(_DENSE_SCHEDULE),
            "model.init_from": None,
            "model.random_init": True,
            "data.height": pre.height,
            "data.width": pre.width,
            "data.train.num_samples": pre.num_samples,
            "data.val.num_samples": pre.val_samples,
            "validation.every_n_steps": pre.val_every,
            "validation.num_batches": max(math.ceil(pre.val_samples / micro), 1),
            "trainer.max_steps": pre.steps,
            "optim.lr": pre.lr,
            "checkpoint.every_n_steps": max(pre.steps // 4, 1),
            "export.formats": ["diffusers"],
        },
    )


def finetune_config(cfg: DictConfig, pretrained: Path) -> DictConfig:
    """Stage 2's training config: the demo's own (T3, high resolution), from the pretrained export."""
    return _derive(
        cfg,
        {
            "experiment_name": "demo_finetune",
            "run_dir": str(Path(cfg.run_dir) / "finetune"),
            "resume": False,  # a fresh fine-tune every run: it is the step being demonstrated
            "model.init_from": str(pretrained),
            "model.random_init": False,
            "export.formats": ["diffusers"],
        },
    )


# --- stages 1 and 2: training -----------------------------------------------------------------------------


class _StepProgress(Callback):
    """A tqdm bar over optimizer steps with the latest loss (train() turns Lightning's own bar off)."""

    def __init__(self, desc: str) -> None:
        self.desc = desc
        self.bar: tqdm | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self.bar = tqdm(total=trainer.max_steps, initial=trainer.global_step, desc=self.desc, leave=False)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.bar is None:
            return
        self.bar.update(trainer.global_step - self.bar.n)
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            self.bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _run_training(cfg: DictConfig, desc: str) -> tuple[Path, dict[str, float]]:
    """`t3.training.train` on ``cfg``; returns the diffusers export folder and the final metrics."""
    from t3.training import train

    metrics, _ = train(cfg, callbacks=[_StepProgress(desc)])
    return Path(cfg.run_dir) / "export" / "diffusers", metrics


def pretrain(cfg: DictConfig, demo: DemoConfig) -> tuple[Path, dict[str, Any]]:
    """Stage 1: dense pretraining at the low resolution, or the cached result of an earlier run.

    Returns:
        ``(export folder, info)``; ``info`` has ``cached``, ``run_dir``, ``key`` and ``seconds`` (of this
        call; the original training time is kept in ``train_seconds``).
    """
    pre_cfg = pretrain_config(cfg, demo)
    run_dir = Path(pre_cfg.run_dir)
    marker = run_dir / "demo_pretrain.json"
    start = time.perf_counter()
    if marker.is_file():
        info = json.loads(marker.read_text())
        logger.info(
            "stage 1/3: reusing the pretrained dense model from %s (cache key %s)", run_dir, info["key"]
        )
        export = Path(info["export"])
        return export, {**info, "cached": True, "seconds": time.perf_counter() - start}

    pre = demo.pretrain
    logger.info(
        "stage 1/3: pretraining the %s DiT with dense attention at %dx%dx%d, %d steps (cached in %s)",
        cfg.model.preset,
        pre.height,
        pre.width,
        cfg.data.num_frames,
        pre.steps,
        run_dir,
    )
    export, _ = _run_training(pre_cfg, "pretrain (dense, low res)")
    info = {
        "key": run_dir.name.removeprefix("pretrain-"),
        "run_dir": str(run_dir),
        "export": str(export),
        "settings": asdict(pre),
        "train_seconds": time.perf_counter() - start,
    }
    from t3.io import write_json_atomic

    # Written last: its presence means the export is complete.
    write_json_atomic(marker, info)
    return export, {**info, "cached": False, "seconds": info["train_seconds"]}


def finetune(cfg: DictConfig, pretrained: Path) -> tuple[Path, dict[str, Any]]:
    """Stage 2: T3 attention, fine-tuned at the high resolution from ``pretrained``.

    Returns:
        ``(export folder, info)`` with ``run_dir``, ``seconds`` and, if the run validated at its last step,
        ``final_val_loss``.
    """
    ft_cfg = finetune_config(cfg, pretrained)
    run_dir = Path(ft_cfg.run_dir)
    # Checkpoints and logs of an earlier demo run would otherwise mix with this one's.
    if run_dir.exists():
        shutil.rmtree(run_dir)
    logger.info(
        "stage 2/3: T3 (%s) fine-tune at %dx%dx%d, %d steps, from %s",
        cfg.t3.name,
        cfg.data.height,
        cfg.data.width,
        cfg.data.num_frames,
        cfg.trainer.max_steps,
        pretrained,
    )
    start = time.perf_counter()
    export, metrics = _run_training(ft_cfg, "fine-tune (T3, high res)")
    info = {"run_dir": str(run_dir), "export": str(export), "seconds": time.perf_counter() - start}
    # The run's own held-out loss after its last step, when it validated there: the same set and noise as
    # the comparison, so it must equal the t3_after_ft row.
    if cfg.validation.every_n_steps and cfg.trainer.max_steps % cfg.validation.every_n_steps == 0:
        info["final_val_loss"] = metrics.get("val/loss")
    return export, info


# --- stage 3: evaluation ----------------------------------------------------------------------------------


class RandomConv3dFeatures(nn.Module):
    """The fixed feature extractor of ``fd_latent_rand3d``: a seeded, untrained 3D-conv network on latents.

    Latents are standardised per channel with fixed statistics (those of the reference set), then pass
    three 3x3x3 convolutions with GELU (the last two stride down), and each of the ``width`` output
    channels is pooled into its mean and standard deviation over time and space: ``2 * width`` features.
    Random convolutional features are a common stand-in when no trained extractor exists; the distance
    compares the three demo models with one another, never with published FVD values.

    Args:
        in_channels: Latent channels.
        mean: Per-channel mean ``[C]`` used to standardise the input.
        std: Per-channel standard deviation ``[C]``.
        width: Convolution channels.
        seed: Weight seed (the network is identical for a given seed, on any machine).
    """

    def __init__(
        self, in_channels: int, mean: torch.Tensor, std: torch.Tensor, *, width: int = 32, seed: int = 0
    ) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = nn.Sequential(
                nn.Conv3d(in_channels, width, 3, padding=1),
                nn.GELU(),
                nn.Conv3d(width, width, 3, stride=(1, 2, 2), padding=1),
                nn.GELU(),
                nn.Conv3d(width, width, 3, stride=2, padding=1),
                nn.GELU(),
            )
        self.register_buffer("mean", mean.detach().float().reshape(1, -1, 1, 1, 1).clone())
        self.register_buffer("std", std.detach().float().clamp_min(1e-6).reshape(1, -1, 1, 1, 1).clone())
        self.num_features = 2 * width  # torchmetrics reads this instead of probing the network
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """``[B, C, T, H, W]`` latents -> ``[B, 2 * width]`` float32 features."""
        h = self.net((latents.float() - self.mean) / self.std).flatten(2)
        return torch.cat([h.mean(-1), h.std(-1)], dim=1)


def frechet_distance(features: nn.Module, real: torch.Tensor, generated: torch.Tensor) -> float:
    """Fréchet distance of ``features`` between two sets (torchmetrics' machinery, as `t3.eval` uses)."""
    from t3.eval.metrics.fvd import FrechetVideoDistance

    metric = FrechetVideoDistance(features)
    metric.update(real, real=True)
    metric.update(generated, real=False)
    return float(metric.compute())


def latent_roughness(latents: torch.Tensor) -> float:
    """Mean squared difference between neighbouring latents along height and width.

    Residual noise in generated latents shows up here first: the held-out latents of smooth synthetic
    videos are locally smooth, noise is not. ``roughness(generated) / roughness(held-out)`` is the demo's
    ``hf_energy_ratio`` (1: as smooth as real latents; 2: twice the high-frequency energy).
    """
    x = latents.float()
    dh = (x[..., 1:, :] - x[..., :-1, :]).square().mean()
    dw = (x[..., :, 1:] - x[..., :, :-1]).square().mean()
    return float((dh + dw) / 2)


def _model_fn(dit: nn.Module) -> Callable[..., torch.Tensor]:
    def fn(x: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return dit(
            hidden_states=x, timestep=timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False
        )[0]

    return fn


@torch.no_grad()
def heldout_loss(
    dit: nn.Module,
    latents: torch.Tensor,
    text: torch.Tensor,
    *,
    sigmas: Sequence[float],
    seed: int,
    batch_size: int,
    num_train_timesteps: int,
    desc: str = "held-out loss",
) -> dict[str, float]:
    """Flow-matching loss on a held-out set at fixed noise levels and fixed noise.

    The noise of sample ``i`` at level ``k`` is seeded exactly as `T3FinetuneModule.validation_step` seeds
    it (``sample_seed(seed, i, stream=k + 1)``), so the value equals the training run's ``val/loss``.

    Returns:
        ``{"sigma=<s>": loss, ..., "mean": mean over the levels}``; each loss is the mean over samples.
    """
    from t3.diffusion import flow_matching_loss_at
    from t3.training.module import sample_seed

    fn = _model_fn(dit)
    out: dict[str, float] = {}
    for k, sigma in enumerate(tqdm(sigmas, desc=desc, leave=False)):
        total = 0.0
        for start in range(0, len(latents), batch_size):
            x0, cond = latents[start : start + batch_size], text[start : start + batch_size]
            noise = torch.stack(
                [
                    torch.randn(
                        x0.shape[1:],
                        generator=torch.Generator().manual_seed(sample_seed(seed, start + i, stream=k + 1)),
                    )
                    for i in range(len(x0))
                ]
            )
            _, info = flow_matching_loss_at(
                fn,
                x0,
                {"encoder_hidden_states": cond},
                float(sigma),
                noise,
                num_train_timesteps=num_train_timesteps,
            )
            total += float(info["per_sample_loss"].sum())
        out[f"sigma={float(sigma):g}"] = total / len(latents)
    out["mean"] = statistics.fmean(out[f"sigma={float(s):g}"] for s in sigmas)
    return out


@torch.no_grad()
def generate_latents(
    dit: nn.Module,
    text: torch.Tensor,
    shape: Sequence[int],
    *,
    steps: int,
    seed: int,
    flow_shift: float,
    num_train_timesteps: int,
    desc: str,
) -> torch.Tensor:
    """Latents sampled with Euler from per-sample seeded noise (seed ``seed + i``), conditioned on ``text``.

    No classifier-free guidance: the demo model never saw an empty caption.
    """
    from t3.diffusion import build_scheduler, sample

    logger.info("generating %d latents with %s (%d Euler steps)", len(text), desc, steps)
    return sample(
        _model_fn(dit),
        (len(text), *shape),
        {"encoder_hidden_states": text},
        scheduler=build_scheduler("euler", num_train_timesteps=num_train_timesteps, flow_shift=flow_shift),
        num_steps=steps,
        guidance_scale=1.0,
        generator=[torch.Generator().manual_seed(seed + i) for i in range(len(text))],
        dtype=torch.float32,
        device="cpu",
        progress=True,
    )


@torch.no_grad()
def step_latency(
    models: Mapping[str, nn.Module], latent_shape: Sequence[int], text_len: int, text_dim: int, repeats: int
) -> dict[str, float]:
    """Median seconds of one DiT forward (batch 1) per model, timed side by side.

    Calls are interleaved (model A, model B, A, B, ...) after one untimed warm-up each, so that a change
    in machine load affects every model alike.
    """
    from t3.profiling import time_call

    generator = torch.Generator().manual_seed(0)
    x = torch.randn((1, *latent_shape), generator=generator)
    text = torch.randn((1, text_len, text_dim), generator=generator)
    timestep = torch.tensor([500.0])
    calls = {
        name: (lambda dit=dit: dit(hidden_states=x, timestep=timestep, encoder_hidden_states=text))
        for name, dit in models.items()
    }
    times: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(repeats):
        for name, call in calls.items():
            times[name].append(time_call(call, "cpu", warmup=1 if r == 0 else 0, repeats=1).median_s)
    return {name: statistics.median(values) for name, values in times.items()}


def _load_set(node: DictConfig, count: int | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Latents ``[N, C, T, H, W]``, text ``[N, L, D]`` and captions of a dataset config (``data.val`` ...)."""
    from hydra.utils import instantiate

    dataset = instantiate(node, _convert_="all")
    n = len(dataset) if count is None else min(count, len(dataset))
    samples = [dataset[i] for i in tqdm(range(n), desc="loading/encoding videos", leave=False)]
    return (
        torch.stack([s["latents"] for s in samples]),
        torch.stack([s["text"] for s in samples]),
        [s["caption"] for s in samples],
    )


def _dit_config(dit: nn.Module) -> dict[str, Any]:
    return dict(dit.config)  # type: ignore[arg-type]


def evaluate(
    cfg: DictConfig, demo: DemoConfig, pretrained: Path, finetuned: Path
) -> tuple[dict[str, Any], dict[str, torch.Tensor], torch.Tensor, list[str]]:
    """Stage 3: the three models at the fine-tune resolution.

    Returns:
        ``(results, generated, reference, captions)``: the numbers (see `run_demo`), the generated latents
        per model, the held-out latents and their captions.
    """
    import t3
    from t3.attention.flops import dit_macs
    from t3.config import validate
    from t3.models import get_spec, load_dit
    from t3.profiling import device_name

    facts = validate(cfg)
    schedule = facts.schedule
    spec = get_spec(cfg.model.preset)
    ev = demo.eval

    # The three models: the untransformed pretrained DiT, a T3 copy of it, and the fine-tuned DiT with T3.
    dense = load_dit(pretrained, preset=cfg.model.preset, transform=False)
    t3_before = t3.transform(
        copy.deepcopy(dense),
        schedule,
        backend=cfg.model.attention_backend,
        tokens_per_call=cfg.model.get("attention_tokens_per_call"),
        allow_schedule_change=True,  # dense-trained weights with T3: the "before fine-tuning" row, on purpose
    )
    t3_after = t3.transform(
        load_dit(finetuned, preset=cfg.model.preset, transform=False),
        schedule,
        backend=cfg.model.attention_backend,
        tokens_per_call=cfg.model.get("attention_tokens_per_call"),
    )
    models = {"dense": dense, "t3_before_ft": t3_before, "t3_after_ft": t3_after}

    reference, text, captions = _load_set(cfg.data.val)
    # The fine-tune's own training videos at the same size: how close a perfect generator could get.
    train_latents, _, _ = _load_set(cfg.data.train, count=len(reference))
    features = RandomConv3dFeatures(
        reference.shape[1],
        reference.mean(dim=(0, 2, 3, 4)),
        reference.std(dim=(0, 2, 3, 4)),
        width=ev.fd_width,
        seed=ev.fd_seed,
    )
    fd_floor = frechet_distance(features, reference, train_latents)

    rows: dict[str, dict[str, Any]] = {}
    generated: dict[str, torch.Tensor] = {}
    for name, dit in models.items():
        loss = heldout_loss(
            dit,
            reference,
            text,
            sigmas=list(cfg.validation.sigmas),
            seed=int(cfg.validation.seed),
            batch_size=int(cfg.batch.micro_size),
            num_train_timesteps=int(cfg.objective.num_train_timesteps),
            desc=f"held-out loss: {name}",
        )
        generated[name] = generate_latents(
            dit,
            text,
            reference.shape[1:],
            steps=ev.sample_steps,
            seed=ev.sample_seed,
            flow_shift=float(cfg.objective.flow_shift),
            num_train_timesteps=int(cfg.objective.num_train_timesteps),
            desc=name,
        )
        rows[name] = {
            "name": name,
            "label": MODEL_NAMES[name],
            "attention": "dense" if name == "dense" else schedule.name,
            "weights": "fine-tuned" if name == "t3_after_ft" else "pretrained",
            "heldout_loss": loss["mean"],
            "heldout_loss_per_sigma": {k: v for k, v in loss.items() if k != "mean"},
            FD_NAME: frechet_distance(features, reference, generated[name]),
            "hf_energy_ratio": latent_roughness(generated[name]) / latent_roughness(reference),
        }

    # Latency and MACs at the fine-tune size and at latency_scale x it, where attention dominates more.
    sizes = {"eval": (int(cfg.data.height), int(cfg.data.width))}
    if ev.latency_scale > 1:
        sizes["scaled"] = (ev.latency_scale * sizes["eval"][0], ev.latency_scale * sizes["eval"][1])
    frames = int(cfg.data.num_frames)
    latency: dict[str, Any] = {
        "device": device_name("cpu"),
        "batch": 1,
        "repeats": ev.latency_repeats,
        "sizes": {},
    }
    macs: dict[str, Any] = {}
    for key, (height, width) in sizes.items():
        latent_shape = spec.latent_shape(frames, height, width)
        grid = (
            latent_shape[1] // spec.patch_size[0],
            latent_shape[2] // spec.patch_size[1],
            latent_shape[3] // spec.patch_size[2],
        )
        logger.info("timing one DiT forward at %dx%dx%d (grid %s): dense vs T3", height, width, frames, grid)
        seconds = step_latency(
            {"dense": dense, "t3": t3_after}, latent_shape, spec.text_len, spec.text_dim, ev.latency_repeats
        )
        size = f"{height}x{width}x{frames}"
        latency["sizes"][key] = {
            "size": size,
            "grid": list(grid),
            "tokens": math.prod(grid),
            "dense_ms": 1e3 * seconds["dense"],
            "t3_ms": 1e3 * seconds["t3"],
            "speedup": seconds["dense"] / seconds["t3"],
        }
        dense_macs = dit_macs(_dit_config(dense), grid, text_tokens=spec.text_len)
        t3_macs = dit_macs(_dit_config(dense), grid, text_tokens=spec.text_len, schedule=schedule)
        macs[key] = {
            "size": size,
            "grid": list(grid),
            "self_attention_dense": dense_macs.self_attention,
            "self_attention_t3": t3_macs.self_attention,
            "self_attention_ratio": dense_macs.self_attention / t3_macs.self_attention,
            "forward_dense": dense_macs.total,
            "forward_t3": t3_macs.total,
            "forward_ratio": dense_macs.total / t3_macs.total,
            "plans": schedule.describe(grid, facts.num_layers),
        }
    for name, row in rows.items():
        which = "dense" if name == "dense" else "t3"
        row["latency_ms"] = {k: v[f"{which}_ms"] for k, v in latency["sizes"].items()}

    results = {
        "size": f"{cfg.data.height}x{cfg.data.width}x{frames}",
        "grid": list(facts.grid),
        "schedule": schedule.name,
        "num_heldout": len(reference),
        "sigmas": [float(s) for s in cfg.validation.sigmas],
        "rows": [rows[name] for name in MODEL_NAMES],
        "fd": {
            "name": FD_NAME,
            "floor_train_vs_heldout": fd_floor,
            "features": f"{2 * ev.fd_width} features of RandomConv3dFeatures(width={ev.fd_width}, seed={ev.fd_seed})",
            "sample_steps": ev.sample_steps,
        },
        "latency": latency,
        "macs": macs,
    }
    return results, generated, reference, captions


# --- stage 4: outputs -------------------------------------------------------------------------------------


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def results_table(results: Mapping[str, Any]) -> str:
    """The comparison as a Markdown table (one row per model)."""
    sizes = results["latency"]["sizes"]
    latency_heads = [f"DiT step @{s['size']} (ms)" for s in sizes.values()]
    eval_macs = results["macs"]["eval"]
    head = ["model", "held-out FM loss", FD_NAME, "HF energy ratio", *latency_heads, "self-attn MACs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in results["rows"]:
        is_dense = row["name"] == "dense"
        attn_macs = eval_macs["self_attention_dense" if is_dense else "self_attention_t3"]
        ratio = "" if is_dense else f" (1/{eval_macs['self_attention_ratio']:.1f})"
        cells = [
            row["label"],
            _fmt(row["heldout_loss"]),
            _fmt(row[FD_NAME]),
            f"{row['hf_energy_ratio']:.2f}",
            *(f"{row['latency_ms'][k]:.1f}" for k in sizes),
            f"{attn_macs / 1e6:.1f} M{ratio}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _sigma_table(results: Mapping[str, Any]) -> str:
    keys = list(results["rows"][0]["heldout_loss_per_sigma"])
    lines = ["| model | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
    for row in results["rows"]:
        values = " | ".join(_fmt(row["heldout_loss_per_sigma"][k]) for k in keys)
        lines.append(f"| {row['name']} | {values} |")
    return "\n".join(lines)


def results_markdown(summary: Mapping[str, Any]) -> str:
    """The whole ``results.md``: set-up, the table, per-level losses, cost, and what each number is."""
    res = summary["results"]
    lat = res["latency"]
    macs = res["macs"]
    fd = res["fd"]
    t = summary["timings_s"]
    pre = summary["pretrain"]
    lines = [
        "# t3 CPU demo: dense vs T3 before / after fine-tuning",
        "",
        f"- pretraining: tiny Wan DiT, dense attention, {pre['size']}, {pre['steps']} steps "
        + ("(reused from the cache)" if pre["cached"] else f"({pre['seconds']:.0f} s)"),
        f"- T3 fine-tune: schedule `{res['schedule']}` at {res['size']} (token grid {tuple(res['grid'])}), "
        f"{summary['finetune']['steps']} steps ({t['finetune']:.0f} s)",
        f"- evaluation at {res['size']} on {res['num_heldout']} held-out videos (not in any training set)",
        f"- device: {lat['device']}; total wall time {t['total']:.0f} s",
        "",
        results_table(res),
        "",
        "Held-out flow-matching loss per noise level (fixed noise; mean of these is the table's column):",
        "",
        _sigma_table(res),
        "",
        "## What the numbers are",
        "",
        "- **held-out FM loss**: mean squared error of the predicted flow at the noise levels above, with "
        "fixed per-sample noise (the training module's validation recipe). Lower is better."
        + (
            f" The fine-tune's own last `val/loss` was {_fmt(summary['finetune']['final_val_loss'])} "
            "(same set, same noise)."
            if summary["finetune"].get("final_val_loss") is not None
            else ""
        ),
        f"- **{FD_NAME}**: Fréchet distance between {res['num_heldout']} generated latents ("
        f"{fd['sample_steps']} Euler steps, same noise and captions for every model) and the held-out latents, "
        f"on the {fd['features']}, a fixed, seeded, random 3D-conv network applied to standardised "
        "latents. **Not I3D-FVD** and not comparable with any published number; it ranks these "
        f"three models only. Floor (fine-tune training videos vs held-out videos): {_fmt(fd['floor_train_vs_heldout'])}.",
        "- **HF energy ratio**: mean squared difference of neighbouring latents (height and width) of the "
        "generated latents over that of the held-out latents: residual noise in the samples. 1 is as smooth "
        "as real latents; higher is noisier.",
        f"- **DiT step latency**: one forward at batch 1, median of {lat['repeats']} interleaved calls per "
        f"model, on {lat['device']}. T3 rows share one number (the weights do not change the cost).",
        "- **self-attn MACs**: self-attention multiply-accumulates of one forward (`t3.attention.flops`).",
        "",
        "## Cost",
        "",
        "| size | token grid | self-attn MACs dense / T3 | forward MACs dense / T3 | latency dense / T3 (ms) |",
        "|---|---|---|---|---|",
    ]
    for key, m in macs.items():
        s = lat["sizes"][key]
        lines.append(
            f"| {m['size']} | {tuple(m['grid'])} ({s['tokens']} tokens) | "
            f"{m['self_attention_dense'] / 1e6:.1f} M / {m['self_attention_t3'] / 1e6:.1f} M "
            f"(**{m['self_attention_ratio']:.1f}x**) | {m['forward_dense'] / 1e6:.0f} M / "
            f"{m['forward_t3'] / 1e6:.0f} M ({m['forward_ratio']:.2f}x) | "
            f"{s['dense_ms']:.1f} / {s['t3_ms']:.1f} ({s['speedup']:.2f}x) |"
        )
    lines += [
        "",
        "Layer plans at the evaluation size:",
        "",
        "```",
        macs["eval"]["plans"],
        "```",
        "",
        "## Files",
        "",
        "- `results.json`: every number above; `demo.png`: training curves and the comparison.",
        "- `videos/latents_sample<k>.mp4`: **latent visualisations** (first three latent channels as RGB, "
        "the same fixed scaling for all panels), panels left to right: held-out video's latents | dense | "
        "T3 before fine-tuning | T3 after fine-tuning; `videos/reference_sample<k>.mp4`: the held-out video "
        "whose caption conditioned the samples. Decoded videos are not written: the demo's tiny VAE is "
        "untrained, so decoding any latent gives noise.",
        "",
    ]
    return "\n".join(lines)


def _read_curves(run_dir: Path) -> dict[str, tuple[list[int], list[float]]]:
    """``{metric: (steps, values)}`` from a run's CSV logs (one file per (re)start, later rows win)."""
    values: dict[str, dict[int, float]] = {}
    versions = sorted((run_dir / "csv").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    for version in versions:
        path = version / "metrics.csv"
        if not path.is_file():
            continue
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                for key in ("train/loss", "val/loss"):
                    if row.get(key):
                        values.setdefault(key, {})[int(row["step"])] = float(row[key])
    return {k: (sorted(v), [v[s] for s in sorted(v)]) for k, v in values.items()}


def _smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over ``window`` values (training losses are noisy: one noise level per sample)."""
    sums = np.cumsum([0.0, *values])
    return [(sums[i + 1] - sums[max(i + 1 - window, 0)]) / min(i + 1, window) for i in range(len(values))]


def _log_y(ax: Any, values: Sequence[float]) -> None:
    """Log scale with plain tick labels where the values span a decade or more, else linear."""
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) >= 10:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(NullFormatter())


def write_plot(
    path: Path,
    summary: Mapping[str, Any],
    reference: torch.Tensor,
    generated: Mapping[str, torch.Tensor],
) -> Path:
    """``demo.png``: training curves, held-out loss per noise level, FD, HF energy, latency, latents."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = summary["results"]
    colours = {"dense": "tab:gray", "t3_before_ft": "tab:red", "t3_after_ft": "tab:green"}
    names = [row["name"] for row in res["rows"]]
    fig, axes = plt.subplots(2, 3, figsize=(17, 9))

    # Training curves: pretraining, then the fine-tune on the same step axis.
    ax = axes[0, 0]
    pre_steps = int(summary["pretrain"]["steps"])
    plotted: list[float] = []
    for stage, run_dir, offset, colour in (
        ("pretrain (dense, low res)", summary["pretrain"]["run_dir"], 0, "tab:blue"),
        ("fine-tune (T3, high res)", summary["finetune"]["run_dir"], pre_steps, "tab:green"),
    ):
        curves = _read_curves(Path(run_dir))
        if "train/loss" in curves:
            steps, values = curves["train/loss"]
            smooth = _smooth(values, 50)
            plotted += smooth
            ax.plot([s + offset for s in steps], smooth, color=colour, label=f"{stage}: train (mean of 50)")
        if "val/loss" in curves:
            steps, values = curves["val/loss"]
            plotted += values
            ax.plot(
                [s + offset for s in steps], values, "o--", color=colour, ms=4, label=f"{stage}: held-out"
            )
    for row in res["rows"]:
        ax.axhline(
            row["heldout_loss"],
            color=colours[row["name"]],
            lw=1,
            ls=":",
            label=f"{row['name']} at {res['size']}",
        )
    ax.axvline(pre_steps, color="k", lw=0.8, alpha=0.4)
    _log_y(ax, plotted)
    ax.set(xlabel="optimizer step", ylabel="flow-matching loss", title="training (T3 swapped in at the line)")
    ax.legend(fontsize=7)

    ax = axes[0, 1]
    sigmas = res["sigmas"]
    per_sigma = []
    for row in res["rows"]:
        ys = [row["heldout_loss_per_sigma"][f"sigma={s:g}"] for s in sigmas]
        per_sigma += ys
        ax.plot(sigmas, ys, "o-", color=colours[row["name"]], label=row["name"])
    _log_y(ax, per_sigma)
    ax.set(
        xlabel="noise level sigma",
        ylabel="held-out loss",
        title=f"held-out loss at {res['size']}, fixed noise",
    )
    ax.legend(fontsize=8)

    ax = axes[0, 2]
    sizes = res["latency"]["sizes"]
    xs = np.arange(len(sizes))
    ax.bar(xs - 0.2, [s["dense_ms"] for s in sizes.values()], 0.4, color="tab:gray", label="dense")
    ax.bar(xs + 0.2, [s["t3_ms"] for s in sizes.values()], 0.4, color="tab:green", label="T3")
    ax.set_xticks(xs, [f"{s['size']}\n{s['tokens']} tokens" for s in sizes.values()])
    ax.set(ylabel="ms per DiT forward (batch 1)", title=f"step latency, {res['latency']['device']}")
    ax.legend(fontsize=8)

    ax = axes[1, 0]
    ax.bar(names, [row[FD_NAME] for row in res["rows"]], color=[colours[n] for n in names])
    ax.axhline(res["fd"]["floor_train_vs_heldout"], color="k", ls=":", lw=1, label="floor: train vs held-out")
    ax.set(ylabel=FD_NAME, title=f"{FD_NAME}: random-feature FD, NOT I3D-FVD")
    ax.legend(fontsize=8)

    ax = axes[1, 1]
    ax.bar(names, [row["hf_energy_ratio"] for row in res["rows"]], color=[colours[n] for n in names])
    ax.axhline(1.0, color="k", ls=":", lw=1, label="held-out latents")
    ax.set(ylabel="HF energy / held-out", title="residual noise in generated latents")
    ax.legend(fontsize=8)

    # The middle latent frame of sample 0, as in the videos.
    ax = axes[1, 2]
    mean, std = reference.mean(dim=(0, 2, 3, 4)), reference.std(dim=(0, 2, 3, 4))
    middle = reference.shape[2] // 2
    tiles = [_latent_rgb(reference[0], mean, std, 1)[middle]]
    tiles += [_latent_rgb(generated[name][0], mean, std, 1)[middle] for name in names]
    gap = np.full((tiles[0].shape[0], 1, 3), 255, dtype=np.uint8)
    ax.imshow(
        np.concatenate([t for tile in tiles for t in (tile, gap)][:-1], axis=1), interpolation="nearest"
    )
    ax.set_xticks(
        [(i + 0.5) * (tiles[0].shape[1] + 1) for i in range(len(tiles))], ["held-out", *names], fontsize=8
    )
    ax.set_yticks([])
    ax.set_title("latent visualisation (channels 0-2), sample 0")

    fig.suptitle("t3 CPU demo: dense pretraining at low res -> T3 attention -> fine-tune at high res")
    fig.tight_layout()
    from t3.io import atomic_path

    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path


def _latent_rgb(latents: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, scale: int) -> np.ndarray:
    """``[C, T, H, W]`` latents -> uint8 ``[T, H*scale, W*scale, 3]``: channels 0-2, mean +- 2.5 std -> 0-255."""
    x = (latents[:3].float() - mean[:3, None, None, None]) / (2.5 * std[:3, None, None, None])
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    x = x.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    return x.permute(1, 2, 3, 0).contiguous().numpy()


def write_videos(
    folder: Path,
    cfg: DictConfig,
    demo: DemoConfig,
    reference: torch.Tensor,
    generated: Mapping[str, torch.Tensor],
) -> list[Path]:
    """Latent visualisations (held-out | dense | T3 before | T3 after) and the held-out pixel videos."""
    from t3.data.synthetic import synthetic_video
    from t3.video_io import write_video

    folder.mkdir(parents=True, exist_ok=True)
    mean, std = reference.mean(dim=(0, 2, 3, 4)), reference.std(dim=(0, 2, 3, 4))
    # Upsample the latent grid to the pixel size it stands for (the VAE's spatial stride).
    scale = max(int(cfg.data.height) // reference.shape[-2], 1)
    written = []
    for k in range(min(demo.eval.num_videos, len(reference))):
        panels = [_latent_rgb(reference[k], mean, std, scale)]
        panels += [_latent_rgb(generated[name][k], mean, std, scale) for name in MODEL_NAMES]
        gap = np.full((*panels[0].shape[:2], 4, 3), 255, dtype=np.uint8)
        strip = np.concatenate([p for panel in panels for p in (panel, gap)][:-1], axis=2)
        # One latent frame covers vae_stride_t = 4 video frames: 4 fps plays them at the videos' 16 fps pace.
        written.append(write_video(folder / f"latents_sample{k}.mp4", strip, fps=4.0))
        video, _ = synthetic_video(
            k,
            frames=int(cfg.data.num_frames),
            height=int(cfg.data.height),
            width=int(cfg.data.width),
            seed=int(cfg.validation.seed),
        )
        written.append(write_video(folder / f"reference_sample{k}.mp4", video, fps=16.0))
    return written


# --- entry ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _torch_threads(num_threads: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_demo(cfg: DictConfig) -> dict[str, Any]:
    """Pretrain dense (cached), apply T3 and fine-tune, compare, and write the results.

    Args:
        cfg: The composed training config of ``experiment=demo`` (``python train.py experiment=demo``).

    Returns:
        The summary written to ``results.json``: ``results`` (``rows``: one per model with
        ``heldout_loss``, ``heldout_loss_per_sigma``, ``fd_latent_rand3d`` and ``latency_ms``; ``fd``,
        ``latency``, ``macs``), ``pretrain`` (``cached``, ``run_dir`` ...), ``finetune``, ``timings_s``,
        ``outputs`` (paths) and ``table`` (the Markdown table).
    """
    from t3.io import write_json_atomic, write_text_atomic

    start = time.perf_counter()
    cfg, demo = demo_settings(cfg)
    out_dir = Path(cfg.run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _torch_threads(demo.num_threads):
        if demo.fast:
            logger.info("demo.fast=true: every stage in miniature (a smoke run; the numbers mean nothing)")
        pretrained, pre_info = pretrain(cfg, demo)
        finetuned, ft_info = finetune(cfg, pretrained)
        logger.info(
            "stage 3/3: evaluating dense, T3 before and T3 after fine-tuning at %sx%s",
            cfg.data.height,
            cfg.data.width,
        )
        eval_start = time.perf_counter()
        results, generated, reference, _ = evaluate(cfg, demo, pretrained, finetuned)
        eval_seconds = time.perf_counter() - eval_start
        videos = write_videos(out_dir / "videos", cfg, demo, reference, generated)

    pre = demo.pretrain
    summary: dict[str, Any] = {
        "fast": demo.fast,
        "results": results,
        "pretrain": {
            **{k: pre_info[k] for k in ("cached", "run_dir", "export", "key", "seconds")},
            "size": f"{pre.height}x{pre.width}x{cfg.data.num_frames}",
            "steps": pre.steps,
        },
        "finetune": {**ft_info, "size": results["size"], "steps": int(cfg.trainer.max_steps)},
        "timings_s": {
            "pretrain": pre_info["seconds"],
            "finetune": ft_info["seconds"],
            "evaluate": eval_seconds,
        },
        "outputs": {
            "markdown": str(out_dir / "results.md"),
            "json": str(out_dir / "results.json"),
            "plot": str(out_dir / "demo.png"),
            "videos": [str(p) for p in videos],
        },
    }
    summary["table"] = results_table(results)
    write_plot(out_dir / "demo.png", summary, reference, generated)
    summary["timings_s"]["total"] = time.perf_counter() - start
    write_text_atomic(out_dir / "results.md", results_markdown(summary))
    write_json_atomic(out_dir / "results.json", summary)

    lat = results["latency"]["sizes"]
    logger.info(
        "demo results at %s (%d held-out videos; %s is a random-feature Fréchet distance, NOT I3D-FVD; "
        "floor %.4g):\n%s",
        results["size"],
        results["num_heldout"],
        FD_NAME,
        results["fd"]["floor_train_vs_heldout"],
        summary["table"],
    )
    logger.info(
        "self-attention MACs dense/T3: %s; step latency dense/T3 on %s: %s",
        ", ".join(f"{m['size']} {m['self_attention_ratio']:.1f}x" for m in results["macs"].values()),
        results["latency"]["device"],
        ", ".join(f"{s['size']} {s['speedup']:.2f}x" for s in lat.values()),
    )
    logger.info(
        "demo done in %.0f s (pretrain %s, fine-tune %.0f s, evaluation %.0f s); outputs in %s",
        summary["timings_s"]["total"],
        "cached" if pre_info["cached"] else f"{pre_info['seconds']:.0f} s",
        ft_info["seconds"],
        eval_seconds,
        out_dir,
    )
    return summary

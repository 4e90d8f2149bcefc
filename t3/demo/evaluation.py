"""Stage 3 of the CPU demo: four models at the fine-tune resolution, measured side by side.

Two pairs, dense and T3 attention each: before fine-tuning (the pretrained weights) and after fine-tuning
at the target resolution with the same steps, data and noise (the dense one is the control: without it a
lower loss of T3 after fine-tuning could be the extra training at the new size, not T3). `evaluate`
returns every number; the comparison the paper's claim needs is ``results["control"]``: T3 after vs dense
after (quality gap) next to T3's cost ratio.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from t3.demo.metrics import (
    FD_NAME,
    RandomConv3dFeatures,
    frechet_distance,
    generate_latents,
    heldout_set_loss,
    latent_roughness,
    step_latency,
)
from t3.demo.settings import DemoConfig

__all__ = ["MODEL_NAMES", "QUALITY_METRICS", "evaluate"]

logger = logging.getLogger(__name__)

#: The four models compared, in table order, with how they are labelled.
MODEL_NAMES: dict[str, str] = {
    "dense_before_ft": "dense before fine-tuning (pretrained weights)",
    "t3_before_ft": "T3 before fine-tuning (pretrained weights)",
    "dense_after_ft": "dense after fine-tuning (the control)",
    "t3_after_ft": "T3 after fine-tuning",
}

#: Quality metrics of every row (lower is better for all three, 1 is best for the HF energy ratio).
QUALITY_METRICS = ("heldout_loss", FD_NAME, "hf_energy_ratio")


def _load_set(node: DictConfig, count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents ``[N, C, T, H, W]`` and text ``[N, L, D]`` of a dataset config (``data.val`` ...)."""
    from hydra.utils import instantiate

    dataset = instantiate(node, _convert_="all")
    n = len(dataset) if count is None else min(count, len(dataset))
    samples = [dataset[i] for i in tqdm(range(n), desc="loading/encoding videos", leave=False)]
    return torch.stack([s["latents"] for s in samples]), torch.stack([s["text"] for s in samples])


def _models(
    cfg: DictConfig, schedule: Any, pretrained: Path, finetuned: Mapping[str, Path]
) -> dict[str, Any]:
    """The four DiTs; dense rows keep diffusers' own attention (the untransformed model)."""
    import t3
    from t3.models import load_dit

    def with_t3(dit: torch.nn.Module, allow_schedule_change: bool = False) -> torch.nn.Module:
        return t3.transform(
            dit,
            schedule,
            backend=cfg.model.attention_backend,
            tokens_per_call=cfg.model.attention_tokens_per_call,
            allow_schedule_change=allow_schedule_change,
        )

    def load(path: Path) -> torch.nn.Module:
        return load_dit(path, preset=cfg.model.preset, transform=False)

    dense = load(pretrained)
    return {
        "dense_before_ft": dense,
        # Dense-trained weights with T3: the "before fine-tuning" row, on purpose.
        "t3_before_ft": with_t3(copy.deepcopy(dense), allow_schedule_change=True),
        "dense_after_ft": load(finetuned["dense"]),
        "t3_after_ft": with_t3(load(finetuned["t3"])),
    }


def evaluate(
    cfg: DictConfig, demo: DemoConfig, pretrained: Path, finetuned: Mapping[str, Path]
) -> tuple[dict[str, Any], dict[str, torch.Tensor], torch.Tensor]:
    """Measure the four models at ``data.{height,width}`` on the held-out set ``data.val``.

    Args:
        cfg: The demo's config (fast overrides applied).
        demo: Its ``demo`` node.
        pretrained: The dense pretraining's diffusers export.
        finetuned: ``{"t3": export, "dense": export}`` of the two fine-tunes.

    Returns:
        ``(results, generated, reference)``: the numbers (``rows``: one per model, ``control``, ``fd``,
        ``latency``, ``macs``), the generated latents per model and the held-out latents.
    """
    from t3.attention.flops import dit_macs
    from t3.config import validate
    from t3.models import get_spec
    from t3.profiling import device_name

    facts = validate(cfg)
    schedule = facts.schedule
    spec = get_spec(cfg.model.preset)
    ev = demo.eval
    models = _models(cfg, schedule, pretrained, finetuned)

    reference, text = _load_set(cfg.data.val)
    # The fine-tunes' own training videos at the same size: how close a perfect generator could get.
    train_latents, _ = _load_set(cfg.data.train, count=len(reference))
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
        loss = heldout_set_loss(
            dit,
            reference,
            text,
            sigmas=list(cfg.validation.sigmas),
            seed=int(cfg.validation.seed),
            batch_size=int(cfg.batch.micro_size),
            num_train_timesteps=int(cfg.objective.num_train_timesteps),
            desc=f"held-out loss: {name}",
        )
        logger.info("generating %d latents with %s (%d Euler steps)", len(text), name, ev.sample_steps)
        generated[name] = generate_latents(
            dit,
            text,
            reference.shape[1:],
            steps=ev.sample_steps,
            seed=ev.sample_seed,
            flow_shift=float(cfg.objective.flow_shift),
            num_train_timesteps=int(cfg.objective.num_train_timesteps),
        )
        rows[name] = {
            "name": name,
            "label": MODEL_NAMES[name],
            "attention": schedule.name if name.startswith("t3") else "dense",
            "weights": "fine-tuned" if name.endswith("after_ft") else "pretrained",
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
    dit_config = dict(models["dense_before_ft"].config)
    for key, (height, width) in sizes.items():
        latent_shape = spec.latent_shape(frames, height, width)
        grid = spec.video_token_grid(frames, height, width)
        logger.info("timing one DiT forward at %dx%dx%d (grid %s): dense vs T3", height, width, frames, grid)
        # The weights do not change the cost: one model of each attention is timed.
        seconds = step_latency(
            {"dense": models["dense_after_ft"], "t3": models["t3_after_ft"]},
            latent_shape,
            spec.text_len,
            spec.text_dim,
            ev.latency_repeats,
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
        dense_macs = dit_macs(dit_config, grid, text_tokens=spec.text_len)
        t3_macs = dit_macs(dit_config, grid, text_tokens=spec.text_len, schedule=schedule)
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
        which = "t3" if name.startswith("t3") else "dense"
        row["latency_ms"] = {k: v[f"{which}_ms"] for k, v in latency["sizes"].items()}

    results = {
        "size": f"{cfg.data.height}x{cfg.data.width}x{frames}",
        "grid": list(facts.grid),
        "schedule": schedule.name,
        "num_heldout": len(reference),
        "sigmas": [float(s) for s in cfg.validation.sigmas],
        "rows": [rows[name] for name in MODEL_NAMES],
        "control": _control(rows["dense_after_ft"], rows["t3_after_ft"], macs, latency),
        "fd": {
            "name": FD_NAME,
            "floor_train_vs_heldout": fd_floor,
            "features": f"{2 * ev.fd_width} features of RandomConv3dFeatures(width={ev.fd_width}, seed={ev.fd_seed})",
            "sample_steps": ev.sample_steps,
        },
        "latency": latency,
        "macs": macs,
    }
    return results, generated, reference


def _control(
    dense: Mapping[str, Any], t3: Mapping[str, Any], macs: Mapping[str, Any], latency: Mapping[str, Any]
) -> dict[str, Any]:
    """T3 after vs dense after fine-tuning: the quality gap of each metric, and what T3 saves for it."""
    return {
        "quality": {
            metric: {
                "dense": dense[metric],
                "t3": t3[metric],
                "t3_minus_dense": t3[metric] - dense[metric],
                "relative": (t3[metric] - dense[metric]) / dense[metric],
            }
            for metric in QUALITY_METRICS
        },
        "cost": {
            key: {
                "size": m["size"],
                "self_attention_ratio": m["self_attention_ratio"],
                "forward_ratio": m["forward_ratio"],
                "speedup": latency["sizes"][key]["speedup"],
            }
            for key, m in macs.items()
        },
    }

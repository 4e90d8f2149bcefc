"""The CPU demo's outputs: Markdown tables and ``results.md``, ``demo.png``, and the latent videos.

Every function here formats numbers that `t3.demo.evaluation.evaluate` measured; nothing is computed
that the results do not hold, except the plot's smoothing of training curves.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from t3.demo.evaluation import MODEL_NAMES
from t3.demo.metrics import FD_NAME
from t3.demo.settings import DemoConfig
from t3.video_io import pixels_to_uint8, write_video

__all__ = ["control_table", "results_markdown", "results_table", "write_plot", "write_videos"]

#: Plot colour of each model row; a fine-tune's training curve takes the colour of its "after" row.
_COLOURS = {
    "dense_before_ft": "tab:gray",
    "t3_before_ft": "tab:red",
    "dense_after_ft": "tab:blue",
    "t3_after_ft": "tab:green",
}


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
        is_dense = row["attention"] == "dense"
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


def control_table(results: Mapping[str, Any]) -> str:
    """T3 after vs dense after fine-tuning (the same training): quality gap beside the cost ratio."""
    control = results["control"]
    quality_names = {
        "heldout_loss": "held-out FM loss",
        FD_NAME: FD_NAME,
        "hf_energy_ratio": "HF energy ratio",
    }
    lines = [
        "| | dense after fine-tuning | T3 after fine-tuning | T3 vs dense |",
        "|---|---|---|---|",
    ]
    for metric, q in control["quality"].items():
        lines.append(
            f"| {quality_names[metric]} | {_fmt(q['dense'])} | {_fmt(q['t3'])} | {100 * q['relative']:+.1f} % |"
        )
    for key, cost in control["cost"].items():
        m = results["macs"][key]
        lines.append(
            f"| self-attn MACs @{cost['size']} | {m['self_attention_dense'] / 1e6:.1f} M | "
            f"{m['self_attention_t3'] / 1e6:.1f} M | 1/{cost['self_attention_ratio']:.1f} |"
        )
    for key, cost in control["cost"].items():
        s = results["latency"]["sizes"][key]
        lines.append(
            f"| DiT step @{cost['size']} (ms) | {s['dense_ms']:.1f} | {s['t3_ms']:.1f} | "
            f"speed-up {cost['speedup']:.2f}x |"
        )
    return "\n".join(lines)


def _sigma_table(results: Mapping[str, Any]) -> str:
    keys = list(results["rows"][0]["heldout_loss_per_sigma"])
    lines = ["| model | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
    for row in results["rows"]:
        values = " | ".join(_fmt(row["heldout_loss_per_sigma"][k]) for k in keys)
        lines.append(f"| {row['name']} | {values} |")
    return "\n".join(lines)


def results_markdown(summary: Mapping[str, Any]) -> str:
    """The whole ``results.md``: set-up, the tables, per-level losses, cost, and what each number is."""
    res = summary["results"]
    lat = res["latency"]
    macs = res["macs"]
    fd = res["fd"]
    t = summary["timings_s"]
    pre = summary["pretrain"]
    ft = summary["finetune"]
    final_val = {k: v["final_val_loss"] for k, v in ft.items() if v.get("final_val_loss") is not None}
    lines = [
        "# t3 CPU demo: dense vs T3, before and after fine-tuning",
        "",
        f"- pretraining: tiny Wan DiT, dense attention, {pre['size']}, {pre['steps']} steps "
        + ("(reused from the cache)" if pre["cached"] else f"({pre['seconds']:.0f} s)"),
        f"- fine-tunes at {res['size']} (token grid {tuple(res['grid'])}) from the pretrained weights, "
        f"{ft['t3']['steps']} steps each, same data and noise: T3 (schedule `{res['schedule']}`, "
        f"{t['finetune_t3']:.0f} s) and dense, the control ({t['finetune_dense']:.0f} s)",
        f"- evaluation at {res['size']} on {res['num_heldout']} held-out videos (not in any training set)",
        f"- device: {lat['device']}; total wall time {t['total']:.0f} s",
        "",
        results_table(res),
        "",
        "## T3 vs dense, both fine-tuned",
        "",
        "The claim needs this pair: the same pretrained weights, fine-tuned at the target size with the same "
        "steps, data, noise and learning rate; only the attention differs. A negative gap means T3 is "
        "better; the cost columns are what T3 saves for it.",
        "",
        control_table(res),
        "",
        "Held-out flow-matching loss per noise level (fixed noise; mean of these is the table's column):",
        "",
        _sigma_table(res),
        "",
        "## What the numbers are",
        "",
        "- **held-out FM loss**: mean squared error of the predicted flow at the noise levels above, with "
        "fixed per-sample noise (`t3.diffusion.heldout_loss`, the training module's validation). Lower is "
        "better."
        + (
            " The fine-tunes' own last `val/loss`: "
            + ", ".join(f"{name} {_fmt(value)}" for name, value in final_val.items())
            + " (same set, same noise)."
            if final_val
            else ""
        ),
        f"- **{FD_NAME}**: Fréchet distance between {res['num_heldout']} generated latents ("
        f"{fd['sample_steps']} Euler steps, same noise and captions for every model) and the held-out latents, "
        f"on the {fd['features']}, a fixed, seeded, random 3D-conv network applied to standardised "
        "latents. **Not I3D-FVD** and not comparable with any published number; it ranks these "
        f"models only. Floor (fine-tune training videos vs held-out videos): {_fmt(fd['floor_train_vs_heldout'])}.",
        "- **HF energy ratio**: mean squared difference of neighbouring latents (height and width) of the "
        "generated latents over that of the held-out latents: residual noise in the samples. 1 is as smooth "
        "as real latents; higher is noisier.",
        f"- **DiT step latency**: one forward at batch 1, median of {lat['repeats']} interleaved calls per "
        f"attention, on {lat['device']}. Rows of the same attention share one number (the weights do not "
        "change the cost).",
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
        "the same fixed scaling for all panels), panels left to right: held-out video's latents | "
        + " | ".join(MODEL_NAMES.values())
        + "; `videos/reference_sample<k>.mp4`: the held-out video whose caption conditioned the samples. "
        "Decoded videos are not written: the demo's tiny VAE is untrained, so decoding any latent gives noise.",
        "- `finetune_t3/`, `finetune_dense/`: the two fine-tune runs (checkpoints, CSV logs, export).",
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
    names = [row["name"] for row in res["rows"]]
    fig, axes = plt.subplots(2, 3, figsize=(17, 9))

    # Training curves: pretraining, then both fine-tunes on the same step axis.
    ax = axes[0, 0]
    pre_steps = int(summary["pretrain"]["steps"])
    plotted: list[float] = []
    for stage, run_dir, offset, colour in (
        ("pretrain (dense, low res)", summary["pretrain"]["run_dir"], 0, "tab:purple"),
        (
            "fine-tune (dense, high res)",
            summary["finetune"]["dense"]["run_dir"],
            pre_steps,
            _COLOURS["dense_after_ft"],
        ),
        (
            "fine-tune (T3, high res)",
            summary["finetune"]["t3"]["run_dir"],
            pre_steps,
            _COLOURS["t3_after_ft"],
        ),
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
    ax.axvline(pre_steps, color="k", lw=0.8, alpha=0.4)
    _log_y(ax, plotted)
    ax.set(
        xlabel="optimizer step", ylabel="flow-matching loss", title="training (fine-tunes start at the line)"
    )
    ax.legend(fontsize=7)

    ax = axes[0, 1]
    sigmas = res["sigmas"]
    per_sigma = []
    for row in res["rows"]:
        ys = [row["heldout_loss_per_sigma"][f"sigma={s:g}"] for s in sigmas]
        per_sigma += ys
        ax.plot(sigmas, ys, "o-", color=_COLOURS[row["name"]], label=row["name"])
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

    labels = [n.replace("_", "\n", 1) for n in names]
    ax = axes[1, 0]
    ax.bar(labels, [row[FD_NAME] for row in res["rows"]], color=[_COLOURS[n] for n in names])
    ax.axhline(res["fd"]["floor_train_vs_heldout"], color="k", ls=":", lw=1, label="floor: train vs held-out")
    ax.set(ylabel=FD_NAME, title=f"{FD_NAME}: random-feature FD, NOT I3D-FVD")
    ax.legend(fontsize=8)

    ax = axes[1, 1]
    ax.bar(labels, [row["hf_energy_ratio"] for row in res["rows"]], color=[_COLOURS[n] for n in names])
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
        [(i + 0.5) * (tiles[0].shape[1] + 1) for i in range(len(tiles))], ["held-out", *labels], fontsize=7
    )
    ax.set_yticks([])
    ax.set_title("latent visualisation (channels 0-2), sample 0")

    fig.suptitle("t3 CPU demo: dense pretraining at low res -> fine-tune at high res, dense (control) and T3")
    fig.tight_layout()
    from t3.io import atomic_path

    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path


def _latent_rgb(latents: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, scale: int) -> np.ndarray:
    """``[C, T, H, W]`` latents -> uint8 ``[T, H*scale, W*scale, 3]``: channels 0-2, mean +- 2.5 std -> 0-255."""
    x = (latents[:3].float() - mean[:3, None, None, None]) / (2.5 * std[:3, None, None, None])
    x = pixels_to_uint8(x)
    x = x.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    return x.permute(1, 2, 3, 0).contiguous().numpy()


def write_videos(
    folder: Path,
    cfg: DictConfig,
    demo: DemoConfig,
    reference: torch.Tensor,
    generated: Mapping[str, torch.Tensor],
) -> list[Path]:
    """Latent visualisations (held-out | one panel per model) and the held-out pixel videos."""
    from t3.data.synthetic import synthetic_video
    from t3.models import get_spec

    spec = get_spec(cfg.model.preset)
    folder.mkdir(parents=True, exist_ok=True)
    mean, std = reference.mean(dim=(0, 2, 3, 4)), reference.std(dim=(0, 2, 3, 4))
    # Upsample the latent grid to the pixel size it stands for (the VAE's spatial stride).
    scale = spec.vae_stride[1]
    written = []
    for k in range(min(demo.eval.num_videos, len(reference))):
        panels = [_latent_rgb(reference[k], mean, std, scale)]
        panels += [_latent_rgb(generated[name][k], mean, std, scale) for name in MODEL_NAMES]
        gap = np.full((*panels[0].shape[:2], 4, 3), 255, dtype=np.uint8)
        strip = np.concatenate([p for panel in panels for p in (panel, gap)][:-1], axis=2)
        # One latent frame covers vae_stride_t video frames: played at the videos' pace.
        latent_fps = spec.frame_rate / spec.vae_stride[0]
        written.append(write_video(folder / f"latents_sample{k}.mp4", strip, fps=latent_fps))
        video, _ = synthetic_video(
            k,
            frames=int(cfg.data.num_frames),
            height=int(cfg.data.height),
            width=int(cfg.data.width),
            seed=int(cfg.validation.seed),
        )
        written.append(write_video(folder / f"reference_sample{k}.mp4", video, fps=spec.frame_rate))
    return written

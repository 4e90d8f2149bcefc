"""What the CPU demo measures on each model: held-out loss, generated latents and their distance to real
ones, residual noise, and step latency. Each function takes a DiT (or latents) and returns numbers.

``fd_latent_rand3d`` is a Fréchet distance on a fixed, seeded, *random* 3D-conv network over latents, not
I3D-FVD: the demo's tiny VAE is untrained, so decoded pixels carry no meaning, and a random network is the
only extractor available offline. It compares the demo's models with one another only.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn
from tqdm import tqdm

__all__ = [
    "FD_NAME",
    "RandomConv3dFeatures",
    "frechet_distance",
    "generate_latents",
    "heldout_set_loss",
    "latent_roughness",
    "step_latency",
]

#: Name of the Fréchet distance reported by the demo (never to be confused with I3D-FVD).
FD_NAME = "fd_latent_rand3d"


class RandomConv3dFeatures(nn.Module):
    """The fixed feature extractor of ``fd_latent_rand3d``: a seeded, untrained 3D-conv network on latents.

    Latents are standardised per channel with fixed statistics (those of the reference set), then pass
    three 3x3x3 convolutions with GELU (the last two stride down), and each of the ``width`` output
    channels is pooled into its mean and standard deviation over time and space: ``2 * width`` features.
    Random convolutional features are a common stand-in when no trained extractor exists; the distance
    compares the demo's models with one another, never with published FVD values.

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
def heldout_set_loss(
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
    """`t3.diffusion.heldout_loss` over a whole held-out set (sample ``i`` at position ``i``).

    Positions and noise are those of the training module's validation of the same set, so the value equals
    a training run's ``val/loss`` on it.

    Returns:
        ``{"sigma=<s>": loss, ..., "mean": mean over the levels}``; each loss is the mean over samples.
    """
    from t3.diffusion import heldout_loss

    fn = _model_fn(dit)
    totals = torch.zeros(len(sigmas), dtype=torch.float64)
    for start in tqdm(range(0, len(latents), batch_size), desc=desc, leave=False):
        end = min(start + batch_size, len(latents))
        losses = heldout_loss(
            fn,
            latents[start:end],
            {"encoder_hidden_states": text[start:end]},
            list(range(start, end)),
            sigmas=sigmas,
            seed=seed,
            num_train_timesteps=num_train_timesteps,
        )
        totals += losses.double().sum(dim=1)
    out = {
        f"sigma={float(s):g}": float(total) / len(latents) for s, total in zip(sigmas, totals, strict=True)
    }
    out["mean"] = statistics.fmean(out.values())
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
) -> torch.Tensor:
    """Latents sampled with Euler from per-sample seeded noise (seed ``seed + i``), conditioned on ``text``.

    No classifier-free guidance: the demo model never saw an empty caption.
    """
    from t3.diffusion import build_scheduler, sample

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

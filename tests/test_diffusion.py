"""Tests for t3.diffusion: flow-matching objective, timestep samplers, samplers with CFG (CPU, fast)."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch

from t3.diffusion import (
    BellWeighting,
    DiffSynthFlowMatchEuler,
    LogitNormalSampler,
    ShiftedDiscreteSampler,
    ShiftedSampler,
    UniformSampler,
    add_noise,
    build_loss_weighting,
    build_scheduler,
    build_timestep_sampler,
    diffsynth_sigmas,
    flow_matching_loss,
    flow_matching_loss_at,
    sample,
    shift_sigma,
    velocity_target,
)

SHAPE = (2, 4, 3, 4, 4)  # [B, C, F, H, W], Wan latent layout


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# flow_matching.py
# ---------------------------------------------------------------------------------------------


def test_shift_sigma_identity_endpoints_monotone() -> None:
    s = torch.linspace(0, 1, 101)
    torch.testing.assert_close(shift_sigma(s, 1.0), s)
    for shift in (0.5, 3.0, 5.0, 12.0):
        out = shift_sigma(s, shift)
        assert out[0].item() == 0.0 and out[-1].item() == pytest.approx(1.0)
        assert bool((out.diff() > 0).all())
    # shift > 1 moves every interior point towards high noise.
    assert bool((shift_sigma(s[1:-1], 5.0) > s[1:-1]).all())
    assert shift_sigma(0.5, 3.0) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="shift must be > 0, got -1"):
        shift_sigma(s, -1)


def test_add_noise_endpoints_and_per_sample_sigma() -> None:
    x0, noise = torch.randn(SHAPE, generator=_gen(0)), torch.randn(SHAPE, generator=_gen(1))
    torch.testing.assert_close(add_noise(x0, noise, torch.zeros(2)), x0)
    torch.testing.assert_close(add_noise(x0, noise, torch.ones(2)), noise)
    mixed = add_noise(x0, noise, torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(mixed[0], x0[0])
    torch.testing.assert_close(mixed[1], noise[1])
    torch.testing.assert_close(velocity_target(x0, noise), noise - x0)
    with pytest.raises(ValueError, match="one per sample"):
        add_noise(x0, noise, torch.zeros(3))


def _oracle(x0: torch.Tensor, noise_box: dict) -> Callable[..., torch.Tensor]:
    """A model that knows x0 and the noise, so it predicts the exact target."""

    def model_fn(x_t: torch.Tensor, timestep: torch.Tensor, **cond) -> torch.Tensor:
        noise_box["timestep"] = timestep
        noise_box["cond"] = cond
        sigma = timestep / 1000
        # Recover the noise from x_t; exact up to float rounding (sigma > 0 here).
        noise = (x_t.float() - (1 - sigma.view(-1, 1, 1, 1, 1)) * x0) / sigma.view(-1, 1, 1, 1, 1)
        return noise - x0

    return model_fn


def test_loss_at_is_zero_for_oracle_and_deterministic() -> None:
    x0, noise = torch.randn(SHAPE, generator=_gen(0)), torch.randn(SHAPE, generator=_gen(1))
    sigmas = torch.tensor([0.25, 0.75])

    def exact(x_t, timestep, **cond):
        return noise - x0

    loss, info = flow_matching_loss_at(exact, x0, {}, sigmas, noise)
    assert loss.item() == 0.0 and loss.dtype == torch.float32
    torch.testing.assert_close(info["timestep"], sigmas * 1000)
    torch.testing.assert_close(info["per_sample_loss"], torch.zeros(2))

    def zero(x_t, timestep, **cond):
        return torch.zeros_like(x_t)

    a, _ = flow_matching_loss_at(zero, x0, {}, sigmas, noise)
    b, _ = flow_matching_loss_at(zero, x0, {}, sigmas, noise)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, (noise - x0).square().mean())
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        flow_matching_loss_at(zero, x0, {}, torch.tensor([0.5, 1.5]), noise)


def test_flow_matching_loss_oracle_bf16_and_cond_passthrough() -> None:
    x0 = torch.randn(SHAPE, generator=_gen(0))
    box: dict = {}
    cond = {"encoder_hidden_states": torch.ones(2, 5, 8)}
    sampler = build_timestep_sampler("shifted", shift=5.0, sigma_min=0.05)
    loss, info = flow_matching_loss(_oracle(x0, box), x0, cond, generator=_gen(3), sampler=sampler)
    assert loss.item() < 1e-8
    assert box["cond"].keys() == cond.keys() and box["timestep"].shape == (2,)
    assert bool((info["sigma"] >= 0.05).all())

    # Same generator seed -> same sigma and noise -> identical loss (for a non-trivial model).
    def bf16_model(x_t, timestep, **cond):
        assert x_t.dtype == torch.bfloat16
        return (0.5 * x_t).to(torch.bfloat16)

    xb = x0.to(torch.bfloat16)
    la, ia = flow_matching_loss(bf16_model, xb, {}, generator=_gen(7), sampler=sampler)
    lb, ib = flow_matching_loss(bf16_model, xb, {}, generator=_gen(7), sampler=sampler)
    assert la.dtype == torch.float32 and torch.equal(la, lb) and torch.equal(ia["sigma"], ib["sigma"])
    lc, _ = flow_matching_loss(bf16_model, xb, {}, generator=_gen(8), sampler=sampler)
    assert not torch.equal(la, lc)


def test_loss_weighting() -> None:
    x0, noise = torch.randn(SHAPE, generator=_gen(0)), torch.randn(SHAPE, generator=_gen(1))

    def zero(x_t, timestep, **cond):
        return torch.zeros_like(x_t)

    sigmas = torch.tensor([0.2, 0.8])
    plain, info = flow_matching_loss_at(zero, x0, {}, sigmas, noise)
    weighted, _ = flow_matching_loss_at(
        zero, x0, {}, sigmas, noise, weighting=lambda s: 2 * torch.ones_like(s)
    )
    torch.testing.assert_close(weighted, 2 * plain)
    only_first, _ = flow_matching_loss_at(zero, x0, {}, sigmas, noise, weighting=lambda s: (s < 0.5).float())
    torch.testing.assert_close(only_first, info["per_sample_loss"][0] / 2)


# ---------------------------------------------------------------------------------------------
# timesteps.py
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sampler", "expected_mean"),
    [
        (UniformSampler(), 0.5),
        (LogitNormalSampler(0.0, 1.0), 0.5),  # symmetric around 0.5
        (ShiftedSampler(1.0), 0.5),
        # E[5u / (1 + 4u)] = 5/4 - 5 ln(5) / 16 for u ~ U(0, 1)
        (ShiftedSampler(5.0), 1.25 - 5 * torch.log(torch.tensor(5.0)).item() / 16),
        # The mean of the 1000 table sigmas 5u / (1 + 4u), u = 1, 0.999, ..., 0.001.
        (
            ShiftedDiscreteSampler(5.0),
            sum(5 * (1 - k / 1000) / (1 + 4 * (1 - k / 1000)) for k in range(1000)) / 1000,
        ),
    ],
)
def test_sampler_statistics_and_bounds(sampler, expected_mean: float) -> None:
    s = sampler.sample(20_000, _gen(0), "cpu")
    assert s.shape == (20_000,) and s.dtype == torch.float32
    assert bool(((s >= 0) & (s <= 1)).all())
    assert s.mean().item() == pytest.approx(expected_mean, abs=0.01)


def test_logit_normal_shape_and_clamp() -> None:
    # sigmoid(N(mean, std)) has median sigmoid(mean).
    s = LogitNormalSampler(mean=1.0, std=0.5).sample(20_000, _gen(1))
    assert s.median().item() == pytest.approx(torch.sigmoid(torch.tensor(1.0)).item(), abs=0.01)
    clamped = build_timestep_sampler("logit-normal", std=3.0, sigma_min=0.1, sigma_max=0.9).sample(
        5000, _gen(2)
    )
    assert clamped.min().item() == pytest.approx(0.1) and clamped.max().item() == pytest.approx(0.9)


def test_sampler_seeded_determinism() -> None:
    sampler = build_timestep_sampler("logit_normal")
    assert torch.equal(sampler.sample(8, _gen(0)), sampler.sample(8, _gen(0)))
    assert not torch.equal(sampler.sample(8, _gen(0)), sampler.sample(8, _gen(1)))


def _diffsynth_table(n: int = 1000, shift: float = 5.0) -> torch.Tensor:
    """The closed form of DiffSynth's training sigmas, float64: shift(u) at u = 1, 1 - 1/n, ..., 1/n."""
    u = torch.tensor([1 - k / n for k in range(n)], dtype=torch.float64)
    return shift * u / (1 + (shift - 1) * u)


def test_shifted_discrete_draws_table_sigmas_uniformly() -> None:
    sampler = build_timestep_sampler("shifted_discrete", shift=5.0, num_timesteps=1000)
    s = sampler.sample(50_000, _gen(0))
    table = _diffsynth_table().float()
    index = (s[:, None] - table[None, :]).abs().argmin(dim=1)
    torch.testing.assert_close(s, table[index], rtol=0, atol=1e-6)  # every draw is a table entry
    counts = torch.bincount(index, minlength=1000).float()
    # 50 per entry on average; uniform within sampling noise (a 10-bin coarse histogram, +-5%).
    assert counts.view(10, 100).sum(1).div(5000).sub(1).abs().max().item() < 0.05
    assert torch.equal(sampler.sample(8, _gen(3)), sampler.sample(8, _gen(3)))


def test_bell_weights_are_the_closed_form_on_the_shifted_table() -> None:
    """y = exp(-2 ((t - 500) / 1000)^2) on the 1000 shifted timesteps t = 1000 sigma, minus its minimum,
    scaled so the 1000 weights sum to 1000 (DiffSynth-Studio FlowMatchScheduler, training=True)."""
    timesteps, weights = BellWeighting(shift=5.0).table()
    t = 1000 * _diffsynth_table()
    y = torch.exp(-2 * ((t - 500) / 1000) ** 2)
    expected = (y - y.min()) * 1000 / (y - y.min()).sum()
    torch.testing.assert_close(timesteps.double(), t, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(weights.double(), expected, rtol=1e-5, atol=1e-6)
    assert weights.sum().item() == pytest.approx(1000, rel=1e-5)
    assert weights[0].item() == 0.0  # t = 1000 (pure noise) is the table's farthest point from 500
    peak = int(weights.argmax())
    assert abs(timesteps[peak].item() - 500) < 1.0
    # The timesteps are the shifted ones: unshifted they would be 1000, 999, ..., 1.
    assert timesteps[500].item() == pytest.approx(1000 * 5 * 0.5 / (1 + 4 * 0.5), rel=1e-6)


def test_bell_weighting_of_table_sigmas_is_the_table_weight_and_weights_the_loss() -> None:
    weighting = build_loss_weighting("bell", shift=5.0, num_train_timesteps=1000)
    _, weights = weighting.table()
    sigmas = ShiftedDiscreteSampler(5.0).sample(64, _gen(4))  # what training draws
    index = (sigmas[:, None] - diffsynth_sigmas(1000, 5.0)[None, :]).abs().argmin(dim=1)
    assert torch.equal(weighting(sigmas), weights[index])  # bit for bit
    assert build_loss_weighting("none") is None
    with pytest.raises(ValueError, match=r"unknown loss weighting 'snr'.*none.*bell"):
        build_loss_weighting("snr")

    x0, noise = torch.randn(SHAPE, generator=_gen(0)), torch.randn(SHAPE, generator=_gen(1))

    def zero(x_t, timestep, **cond):
        return torch.zeros_like(x_t)

    pair = sigmas[:2]
    loss, info = flow_matching_loss_at(zero, x0, {}, pair, noise, weighting=weighting)
    torch.testing.assert_close(loss, (weighting(pair) * info["per_sample_loss"]).mean())


def test_build_timestep_sampler_errors() -> None:
    assert build_timestep_sampler("shifted", shift=3.0) == ShiftedSampler(3.0)
    with pytest.raises(
        ValueError,
        match=r"unknown timestep sampler 'cosine'.*logit_normal.*shifted.*shifted_discrete.*uniform",
    ):
        build_timestep_sampler("cosine")
    with pytest.raises(ValueError, match="shift must be > 0, got -1"):
        build_timestep_sampler("shifted", shift=-1)
    with pytest.raises(ValueError, match="std must be > 0, got 0"):
        build_timestep_sampler("logit_normal", std=0)
    with pytest.raises(ValueError, match=r"sigma_max must be in \[sigma_min=0.5, 1\], got 0.2"):
        build_timestep_sampler("uniform", sigma_min=0.5, sigma_max=0.2)
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['shift'\]"):
        build_timestep_sampler("uniform", shift=2.0)


# ---------------------------------------------------------------------------------------------
# sampling.py
# ---------------------------------------------------------------------------------------------


class ToyModel:
    """Deterministic per-sample function of (x, t, cond) that counts its calls and batch sizes."""

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []

    def __call__(
        self, x: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        self.batch_sizes.append(x.shape[0])
        assert timestep.shape == (x.shape[0],)
        t = timestep.float().view(-1, 1, 1, 1, 1) / 1000
        emb = encoder_hidden_states.mean(dim=1).view(x.shape[0], -1, 1, 1, 1)  # [N, C] -> broadcast
        return 0.9 * x - 0.2 * t * x + emb


def _run(model, *, seed: int = 0, guidance: float = 5.0, scheduler: str = "unipc", uncond=True, **kw):
    cond = {"encoder_hidden_states": torch.randn(2, 6, 4, generator=_gen(100))}
    neg = {"encoder_hidden_states": torch.randn(2, 6, 4, generator=_gen(101))} if uncond else None
    return sample(
        model,
        SHAPE,
        cond,
        neg,
        scheduler=build_scheduler(scheduler),
        num_steps=kw.pop("num_steps", 6),
        guidance_scale=guidance,
        generator=kw.pop("generator", _gen(seed)),
        dtype=torch.float32,
        device="cpu",
        progress=False,
        **kw,
    )


@pytest.mark.parametrize("scheduler", ["diffsynth_euler", "euler", "unipc"])
def test_sample_seeded_determinism(scheduler: str) -> None:
    a = _run(ToyModel(), seed=0, scheduler=scheduler)
    b = _run(ToyModel(), seed=0, scheduler=scheduler)
    c = _run(ToyModel(), seed=1, scheduler=scheduler)
    assert a.dtype == torch.float32 and a.shape == SHAPE
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_per_sample_generators() -> None:
    both = _run(ToyModel(), generator=[_gen(0), _gen(1)], guidance=1.0)
    # Sample i's noise comes from generator i alone, independent of its position in the batch.
    noise = torch.cat([torch.randn((1, *SHAPE[1:]), generator=_gen(s)) for s in (0, 1)])
    direct = _run(ToyModel(), generator=None, latents=noise, guidance=1.0)
    assert torch.equal(both, direct)
    with pytest.raises(ValueError, match="one per sample"):
        _run(ToyModel(), generator=[_gen(0)])


def test_cfg_batched_equals_two_passes_with_one_call_per_step() -> None:
    batched_model, separate_model = ToyModel(), ToyModel()
    batched = _run(batched_model, guidance=5.0, batch_cfg=True)
    separate = _run(separate_model, guidance=5.0, batch_cfg=False)
    torch.testing.assert_close(batched, separate, rtol=1e-6, atol=1e-6)
    assert batched_model.batch_sizes == [4] * 6  # one forward of 2B per step
    assert separate_model.batch_sizes == [2] * 12
    # Guidance actually does something.
    assert not torch.allclose(batched, _run(ToyModel(), guidance=1.0))


def test_no_cfg_makes_single_unbatched_call() -> None:
    for guidance, uncond in ((1.0, True), (0.5, True), (7.5, False)):
        model = ToyModel()
        _run(model, guidance=guidance, uncond=uncond)
        assert model.batch_sizes == [2] * 6


def test_callback_sees_every_step() -> None:
    seen: list[int] = []
    _run(ToyModel(), callback=lambda i, t, x: seen.append(i))
    assert seen == list(range(6))


@pytest.mark.parametrize(("scheduler", "tol"), [("diffsynth_euler", 1e-5), ("euler", 1e-5), ("unipc", 1e-2)])
def test_sampler_reaches_point_mass(scheduler: str, tol: float) -> None:
    """For data x0 = c, x_t = (1 - s) c + s eps, so eps = (x_t - (1 - s) c) / s and the exact
    velocity eps - x0 is (x_t - c) / s; integrating it from pure noise must land on c.
    UniPC feeds integer (truncated) timesteps to the model, so its sigma estimate is off by
    < 1e-3 relative, hence the looser tolerance."""
    c = torch.tensor([0.3, -1.2]).view(2, 1, 1, 1, 1).expand(SHAPE).contiguous()

    def exact_velocity(x, timestep, target):
        sigma = timestep.float().view(-1, 1, 1, 1, 1) / 1000
        return (x - target) / sigma

    out = sample(
        exact_velocity,
        SHAPE,
        {"target": c},
        scheduler=build_scheduler(scheduler, flow_shift=5.0),
        num_steps=20,
        guidance_scale=1.0,
        generator=_gen(0),
        dtype=torch.float32,
        device="cpu",
        progress=False,
    )
    assert (out - c).abs().max().item() < tol


@pytest.mark.parametrize("steps", [1, 3, 50])
def test_diffsynth_euler_sigmas_are_the_closed_form(steps: int) -> None:
    """u = linspace(1, 0, steps + 1)[:-1], sigma = s u / (1 + (s - 1) u), timestep 1000 sigma, then 0."""
    scheduler = build_scheduler("diffsynth_euler", flow_shift=5.0)
    scheduler.set_timesteps(steps)
    u = torch.tensor([1 - k / steps for k in range(steps)], dtype=torch.float64)
    expected = 5 * u / (1 + 4 * u)
    assert scheduler.sigmas.shape == (steps + 1,) and scheduler.timesteps.shape == (steps,)
    torch.testing.assert_close(scheduler.sigmas[:-1].double(), expected, rtol=1e-6, atol=1e-7)
    assert scheduler.sigmas[0].item() == 1.0 and scheduler.sigmas[-1].item() == 0.0
    torch.testing.assert_close(scheduler.timesteps.double(), 1000 * expected, rtol=1e-6, atol=1e-4)


def test_diffsynth_euler_differs_from_diffusers_euler_at_the_low_noise_end() -> None:
    ours, theirs = build_scheduler("diffsynth_euler"), build_scheduler("euler")
    ours.set_timesteps(50)
    theirs.set_timesteps(50)
    # The last non-zero sigma: shift(1/50) here; diffusers spaces u over [1, shift(1/1000)], then shifts.
    shift = lambda u: 5 * u / (1 + 4 * u)  # noqa: E731
    assert ours.sigmas[-2].item() == pytest.approx(shift(0.02), rel=1e-6)
    assert theirs.sigmas[-2].item() == pytest.approx(shift(shift(0.001)), rel=1e-4)


def test_diffsynth_euler_steps_are_plain_euler() -> None:
    """Step i: x + v (sigma_{i+1} - sigma_i); the last one goes to sigma = 0, i.e. x - sigma_last v."""
    scheduler = DiffSynthFlowMatchEuler(shift=5.0)
    scheduler.set_timesteps(4)
    scheduler.set_begin_index(0)
    x, v = torch.randn(SHAPE, generator=_gen(0)), torch.randn(SHAPE, generator=_gen(1))
    u = [1.0, 0.75, 0.5, 0.25]
    sigma = [5 * a / (1 + 4 * a) for a in u] + [0.0]
    for i, t in enumerate(scheduler.timesteps):
        out = scheduler.step(v, t, x, return_dict=False)[0]
        torch.testing.assert_close(out, x + v * (sigma[i + 1] - sigma[i]), rtol=1e-6, atol=1e-6)
        x = out
    # Without a begin index the step is found from the timestep, as upstream does.
    fresh = DiffSynthFlowMatchEuler(shift=5.0)
    fresh.set_timesteps(4)
    y = torch.zeros(SHAPE)
    torch.testing.assert_close(fresh.step(v, fresh.timesteps[2], y).prev_sample, v * (sigma[3] - sigma[2]))
    with pytest.raises(RuntimeError, match="set_timesteps"):
        DiffSynthFlowMatchEuler().step(v, 1000.0, y)
    with pytest.raises(ValueError, match="shift must be > 0"):
        DiffSynthFlowMatchEuler(shift=0.0)


def test_build_scheduler_configs_and_errors() -> None:
    euler = build_scheduler("euler", flow_shift=3.0)
    assert type(euler).__name__ == "FlowMatchEulerDiscreteScheduler" and euler.config.shift == 3.0
    unipc = build_scheduler("UniPC", flow_shift=5.0)
    assert type(unipc).__name__ == "UniPCMultistepScheduler"
    assert unipc.config.prediction_type == "flow_prediction" and unipc.config.use_flow_sigmas
    assert unipc.config.flow_shift == 5.0
    diffsynth = build_scheduler("diffsynth_euler", flow_shift=3.0)
    assert isinstance(diffsynth, DiffSynthFlowMatchEuler) and diffsynth.config.shift == 3.0
    with pytest.raises(ValueError, match=r"unknown scheduler 'ddim'.*diffsynth_euler.*euler.*unipc"):
        build_scheduler("ddim")
    with pytest.raises(ValueError, match="flow_shift must be > 0"):
        build_scheduler("euler", flow_shift=0.0)


def test_sample_input_errors() -> None:
    with pytest.raises(ValueError, match="CPU torch.Generator"):
        # Stand-in for a CUDA generator (only its .device is inspected before drawing).
        _run(ToyModel(), generator=SimpleNamespace(device=torch.device("cuda")))
    with pytest.raises(ValueError, match="same keys"):
        sample(
            ToyModel(),
            SHAPE,
            {"encoder_hidden_states": torch.zeros(2, 6, 4)},
            {"other": torch.zeros(2, 6, 4)},
            scheduler=build_scheduler("euler"),
            num_steps=2,
            guidance_scale=3.0,
            generator=_gen(0),
            dtype=torch.float32,
            device="cpu",
            progress=False,
        )


def test_tiny_wan_transformer_end_to_end() -> None:
    """The objective and sampler drive a real (tiny, random) diffusers WanTransformer3DModel."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=32,
        ffn_dim=32,
        num_layers=1,
        rope_max_seq_len=32,
    )

    def model_fn(x, timestep, **kw):
        # return_dict=False gives a tuple; the t3 helpers unwrap it.
        return model(hidden_states=x, timestep=timestep, return_dict=False, **kw)

    x0 = torch.randn(2, 4, 3, 8, 8, generator=_gen(0))
    text = {"encoder_hidden_states": torch.randn(2, 7, 16, generator=_gen(1))}
    loss, _ = flow_matching_loss(
        model_fn, x0, text, generator=_gen(2), sampler=build_timestep_sampler("shifted", shift=5.0)
    )
    loss.backward()
    assert torch.isfinite(loss) and model.proj_out.weight.grad is not None

    out = sample(
        model_fn,
        x0.shape,
        text,
        {"encoder_hidden_states": torch.zeros(2, 7, 16)},
        scheduler=build_scheduler("unipc"),
        num_steps=3,
        guidance_scale=5.0,
        generator=_gen(3),
        dtype=torch.float32,
        device="cpu",
        progress=False,
    )
    assert out.shape == x0.shape and bool(torch.isfinite(out).all())

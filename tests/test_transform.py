"""t3.transform on a tiny random diffusers WanTransformer3DModel."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from diffusers import WanTransformer3DModel
from torch._dynamo.testing import CompileCounter

import t3
from t3.attention import PlanError, build_schedule
from t3.attention.reference import t3_attention_reference
from t3.attention.schedule import WAN21_4K_PIECES
from t3.models.tiny import TINY_DIT_CONFIG
from t3.transform import T3AttnProcessor, schedule_of

# `t3.transform` is the function (the package exports it); its module holds the processor and helpers.
transform_module = importlib.import_module("t3.transform")

TINY = TINY_DIT_CONFIG  # 2 heads x 12, 5 layers, 4 latent channels, text_dim 16
# One period of 5 layer rules on the grid (3, 4, 6) of a [B, 4, 3, 8, 12] latent, with padding.
MIXED = build_schedule("mixed", pieces=[(3, 1, 1), (1, 2, 3), (3, 4, 6), (2, 3, 4), (1, 1, 1)])


@pytest.fixture
def model() -> WanTransformer3DModel:
    torch.manual_seed(0)
    return WanTransformer3DModel(**TINY).eval()


def inputs(batch=2, frames=3, height=8, width=12):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, frames, height, width, generator=g)
    t = torch.tensor([500.0, 200.0])[:batch]
    text = torch.randn(batch, 7, 16, generator=g)
    return x, t, text


@torch.no_grad()
def test_dense_schedule_reproduces_the_untransformed_model(model):
    x, t, text = inputs()
    ref = model(x, t, text).sample
    t3.transform(model, "dense")
    torch.testing.assert_close(model(x, t, text).sample, ref, atol=1e-5, rtol=0)


@torch.no_grad()
def test_t3_schedule_equals_masked_dense_reference_model(model, monkeypatch):
    x, t, text = inputs()
    dense = model(x, t, text).sample
    t3.transform(model, MIXED)
    out = model(x, t, text).sample
    assert (out - dense).abs().max() > 1e-3  # windows change the function

    def reference(q, k, v, index, backend, **_):
        return t3_attention_reference(q, k, v, index.grid, index.plan, index.branches)

    monkeypatch.setattr(transform_module, "grouped_attention", reference)
    torch.testing.assert_close(model(x, t, text).sample, out, atol=1e-5, rtol=1e-5)


def test_state_dict_unchanged_and_only_self_attention_swapped(model, tmp_path):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    t3.transform(model, "wan21_windows")
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(before[k], after[k]) for k in before)
    processors = model.attn_processors
    assert all(isinstance(p, T3AttnProcessor) for k, p in processors.items() if ".attn1." in k)
    assert not any(isinstance(p, T3AttnProcessor) for k, p in processors.items() if ".attn2." in k)
    assert schedule_of(model).name == "wan21_windows"
    # The transformed model saves and loads back into plain diffusers with the same weights.
    model.save_pretrained(tmp_path)
    loaded = WanTransformer3DModel.from_pretrained(tmp_path)
    assert all(torch.equal(before[k], v) for k, v in loaded.state_dict().items())


@torch.no_grad()
def test_untransform_restores_original_processors(model):
    x, t, text = inputs()
    ref = model(x, t, text).sample
    originals = dict(model.attn_processors)
    t3.transform(model, MIXED)
    t3.untransform(model)
    assert model.attn_processors == originals
    torch.testing.assert_close(model(x, t, text).sample, ref, atol=0, rtol=0)
    assert schedule_of(model) is None
    with pytest.raises(ValueError, match="not transformed"):
        t3.untransform(model)


@torch.no_grad()
def test_one_transformed_model_runs_at_any_resolution(model):
    t3.transform(model, "wan21_windows")
    for frames, height, width in [(3, 8, 12), (5, 16, 10), (1, 6, 6)]:
        x, t, text = inputs(1, frames, height, width)
        assert model(x, t, text).sample.shape == x.shape


def test_plan_that_does_not_fit_fails_before_attention_naming_the_layer(model):
    t3.transform(model, build_schedule("fixed", pieces=WAN21_4K_PIECES))
    x, t, text = inputs()
    with pytest.raises(PlanError, match="layer 0: plan \\(21, 1, 1\\) cannot apply to grid \\(3, 4, 6\\)"):
        model(x, t, text)


def test_gradient_checkpointing_gives_same_output_and_gradients(model):
    t3.transform(model, MIXED)
    x, t, text = inputs()
    results = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        out = model(x, t, text).sample
        out.square().mean().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        results.append((out.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-6, rtol=1e-6)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_transform_rejects_other_models():
    with pytest.raises(TypeError, match="expects a diffusers WanTransformer3DModel"):
        t3.transform(torch.nn.Linear(2, 2), "dense")


@torch.no_grad()
def test_tokens_per_call_reaches_every_layer_and_keeps_the_output(model, monkeypatch):
    x, t, text = inputs()
    t3.transform(model, MIXED)
    out = model(x, t, text).sample
    t3.transform(model, MIXED, tokens_per_call=5)  # runs of single groups where groups exceed 5 slots
    assert {attn.processor.tokens_per_call for attn in (b.attn1 for b in model.blocks)} == {5}
    seen = []
    real = transform_module.grouped_attention

    def spy(*args, **kwargs):
        seen.append(kwargs["tokens_per_call"])
        return real(*args, **kwargs)

    monkeypatch.setattr(transform_module, "grouped_attention", spy)
    torch.testing.assert_close(model(x, t, text).sample, out, atol=1e-5, rtol=1e-5)
    assert seen == [5] * len(model.blocks)
    with pytest.raises(ValueError, match="tokens_per_call must be a positive integer or None, got 0"):
        t3.transform(model, MIXED, tokens_per_call=0)


# --- copies (teacher/student, EMA) ------------------------------------------------------------------------


@torch.no_grad()
def test_deep_copy_of_a_transformed_model_records_its_own_grid(model):
    t3.transform(model, "wan21_windows")
    twin = copy.deepcopy(model)  # what teacher/student and EMA code do
    small, large = inputs(1, 3, 8, 12), inputs(1, 5, 16, 10)
    # The copy's first call runs on its own recorded grid (it used to find none) ...
    expected_small = model(*small).sample
    torch.testing.assert_close(twin(*small).sample, expected_small, atol=0, rtol=0)
    # ... and later calls never read the original's grid (they used to, silently).
    expected_large = model(*large).sample
    torch.testing.assert_close(twin(*small).sample, expected_small, atol=0, rtol=0)
    torch.testing.assert_close(model(*large).sample, expected_large, atol=0, rtol=0)
    assert schedule_of(twin).name == "wan21_windows"


@torch.no_grad()
def test_transform_and_untransform_of_a_copy_leave_the_original_alone(model):
    x, t, text = inputs()
    dense = model(x, t, text).sample
    t3.transform(model, MIXED)
    windowed = model(x, t, text).sample
    twin = copy.deepcopy(model)
    t3.untransform(twin)
    assert (len(twin._forward_pre_hooks), len(model._forward_pre_hooks)) == (0, 1)  # each its own hook
    torch.testing.assert_close(twin(x, t, text).sample, dense, atol=0, rtol=0)
    torch.testing.assert_close(model(x, t, text).sample, windowed, atol=0, rtol=0)
    t3.transform(twin, MIXED)
    torch.testing.assert_close(twin(x, t, text).sample, windowed, atol=0, rtol=0)
    t3.untransform(model)
    torch.testing.assert_close(model(x, t, text).sample, dense, atol=0, rtol=0)
    torch.testing.assert_close(twin(x, t, text).sample, windowed, atol=0, rtol=0)


# --- torch.compile ----------------------------------------------------------------------------------------


def test_compiled_30_layer_model_compiles_once_per_resolution():
    """All layers trace into one graph per resolution: no graph break, no per-layer recompile.

    Before, dynamo guarded each layer's processor on its plan and broke the graph in the op, so a
    30-layer model hit ``recompile_limit`` (8) at its second resolution and fell back to eager.
    """
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = WanTransformer3DModel(**{**TINY, "num_layers": 30}).eval()
    t3.transform(model, "wan21_windows")
    counter = CompileCounter()  # counts the graphs compiled; runs them eagerly (fast to compile)
    compiled = torch.compile(model, backend=counter, fullgraph=True)  # fullgraph: a graph break fails
    small, large = inputs(1, 3, 8, 12), inputs(1, 5, 16, 10)
    with torch.no_grad():
        for x, t, text in (small, large, small, large):
            expected = model(x, t, text).sample
            torch.testing.assert_close(compiled(x, t, text).sample, expected, atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 2
    torch._dynamo.reset()


def test_compiled_training_step_has_one_graph_and_eager_gradients(model):
    """Backward too: the op's saved-tensor hooks stand aside under compile (they would break the graph)."""
    torch._dynamo.reset()
    t3.transform(model, MIXED)
    model.train()
    x, t, text = inputs()
    grads = []
    for run in (model, torch.compile(model, backend="aot_eager", fullgraph=True)):
        model.zero_grad()
        run(x, t, text).sample.square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    for eager, compiled in zip(*grads, strict=True):
        torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-5)
    torch._dynamo.reset()

"""DiT loading/saving in diffusers and original Wan formats, key conversion, presets."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from t3.models import (
    CheckpointMismatchError,
    diffusers_to_wan,
    get_spec,
    load_dit,
    preset_names,
    save_dit,
    wan_to_diffusers,
)
from t3.models.presets import dit_config
from t3.models.tiny import TINY_TEXT_DIM, TINY_VAE_CONFIG, save_tiny_dit, tiny_dit
from t3.models.wan_keys import detect_key_format, strip_known_prefix

# --- helpers ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model() -> WanTransformer3DModel:
    return tiny_dit(seed=0)


@pytest.fixture(scope="module")
def wan_sd(model) -> dict[str, torch.Tensor]:
    """The tiny model's weights under original Wan names."""
    return {k: v.clone() for k, v in diffusers_to_wan(model.state_dict()).items()}


def _forward(m: WanTransformer3DModel) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 2, 4, 6, generator=gen)
    text = torch.randn(2, 7, TINY_TEXT_DIM, generator=gen)
    with torch.no_grad():
        return m(x, torch.tensor([10, 900]), text, return_dict=False)[0]


def _assert_same_weights(a: WanTransformer3DModel, b: WanTransformer3DModel) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


def _assert_same_model(a: WanTransformer3DModel, b: WanTransformer3DModel) -> None:
    _assert_same_weights(a, b)
    assert torch.equal(_forward(a), _forward(b))


# --- presets and key conversion ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "n_params"), [("wan2.1-t2v-1.3b", 1_418_996_800), ("wan2.2-ti2v-5b", 4_999_787_712)]
)
def test_real_presets_on_meta_device(name, n_params):
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    with torch.device("meta"):
        m = WanTransformer3DModel(**dit_config(name))
    count = sum(p.numel() for p in m.parameters())
    assert count == n_params
    assert (
        (1.3e9 if name.startswith("wan2.1") else 4.8e9)
        < count
        < (1.5e9 if name.startswith("wan2.1") else 5.2e9)
    )

    sd = m.state_dict()
    wan = diffusers_to_wan(sd)  # strict: raises on any unmapped key
    assert len(wan) == len(sd)
    assert list(wan_to_diffusers(wan)) == list(sd)
    assert {"blocks.0.self_attn.norm_q.weight", "blocks.0.norm3.weight", "blocks.0.modulation"} <= set(wan)
    assert {"head.head.weight", "head.modulation", "time_projection.1.weight"} <= set(wan)
    # Our table agrees with diffusers' own converter key for key.
    assert list(convert_wan_transformer_to_diffusers(dict(wan))) == list(sd)


def test_specs():
    assert preset_names() == ["tiny", "wan2.1-t2v-1.3b", "wan2.2-ti2v-5b"]
    wan21, wan22 = get_spec("wan2.1-t2v-1.3b"), get_spec("wan2.2-ti2v-5b")
    assert wan21.vae_stride == (4, 8, 8) and wan21.pixel_multiple == 16
    assert wan22.vae_stride == (4, 16, 16) and wan22.pixel_multiple == 32
    spec = get_spec("Wan2.2-TI2V-5B")
    assert spec.vae_channels == 48 == spec.dit_config["in_channels"] and spec.dim == 3072
    assert spec.latent_shape(121, 704, 1280) == (48, 31, 44, 80)
    with pytest.raises(ValueError, match="height 720 is not a multiple of 32 .* nearest valid: 704 or 736"):
        spec.latent_shape(121, 720, 1280)
    tiny = get_spec("tiny")
    assert tiny.vae_channels == TINY_VAE_CONFIG["z_dim"] == tiny.dit_config["in_channels"]
    assert tiny.text_dim == TINY_TEXT_DIM == tiny.dit_config["text_dim"]
    with pytest.raises(
        ValueError, match=r"Unknown model preset 'wan9'.*\['tiny', 'wan2.1-t2v-1.3b', 'wan2.2-ti2v-5b'\]"
    ):
        get_spec("wan9")


def test_key_format_detection_and_prefixes(wan_sd, model):
    assert detect_key_format(wan_sd) == "wan"
    assert detect_key_format(model.state_dict()) == "diffusers"
    assert detect_key_format(["foo.weight", "patch_embedding.weight"]) is None
    assert strip_known_prefix(["model.diffusion_model.blocks.0.x", "model.diffusion_model.head.y"]) == (
        "model.diffusion_model."
    )
    assert strip_known_prefix(["module.model.a", "module.model.b"]) == "module.model."
    assert strip_known_prefix(["model.a", "dit.b"]) == ""
    with pytest.raises(KeyError, match="no mapping"):
        wan_to_diffusers({"blocks.0.lora_A.weight": 1})


# --- loading each format ----------------------------------------------------------------------------------


def test_load_diffusers_folder(model, tmp_path):
    save_dit(model, tmp_path / "ckpt", "diffusers")
    assert (tmp_path / "ckpt" / "config.json").is_file()
    loaded = load_dit(tmp_path / "ckpt")
    _assert_same_model(model, loaded)
    assert not any(p.is_meta for p in loaded.parameters()) and not loaded.training
    assert all(p.requires_grad for p in loaded.parameters())
    # A pipeline folder holds the DiT in transformer/.
    save_dit(model, tmp_path / "pipe" / "transformer", "diffusers")
    _assert_same_weights(model, load_dit(tmp_path / "pipe"))


def test_load_wan_single_file_needs_preset(model, wan_sd, tmp_path):
    file = tmp_path / "wan.safetensors"
    save_file(wan_sd, file)
    with pytest.raises(ValueError) as err:
        load_dit(file)
    msg = str(err.value)
    assert str(file) in msg and "original Wan keys" in msg
    assert "pass preset= one of ['tiny', 'wan2.1-t2v-1.3b', 'wan2.2-ti2v-5b']" in msg
    _assert_same_model(model, load_dit(file, preset="tiny"))


def test_load_wan_shards(model, tmp_path):
    folder = save_dit(model, tmp_path / "sharded", "wan", max_shard_size=20_000)
    shards = sorted(folder.glob("diffusion_pytorch_model-*-of-*.safetensors"))
    assert len(shards) > 2 and (folder / "diffusion_pytorch_model.safetensors.index.json").is_file()
    config = json.loads((folder / "config.json").read_text())
    assert config["dim"] == 24 and config["num_heads"] == 2 and config["num_layers"] == 5
    assert config["in_dim"] == config["out_dim"] == 4 and config["model_type"] == "t2v"
    assert config["t3_preset"] == "tiny"
    _assert_same_model(model, load_dit(folder))  # via the index, config from config.json

    (folder / "diffusion_pytorch_model.safetensors.index.json").unlink()
    _assert_same_weights(model, load_dit(folder))  # shards found by name
    _assert_same_weights(model, load_dit(shards[0]))  # one shard names the whole set

    shards[1].unlink()
    with pytest.raises(FileNotFoundError, match=f"shard not found: {shards[1]}"):
        load_dit(folder)


@pytest.mark.parametrize("prefix", ["model.", "dit.", "model.diffusion_model.", "module.model."])
def test_load_prefixed_release_file(model, wan_sd, tmp_path, prefix):
    # The T3-Video release checkpoints: original Wan keys, possibly under a wrapper prefix.
    file = tmp_path / "T3-Video-Wan2.1-T2V-1.3B.safetensors"
    save_file({prefix + k: v for k, v in wan_sd.items()}, file)
    _assert_same_model(model, load_dit(file, preset="tiny"))
    _assert_same_weights(model, load_dit(tmp_path, preset="tiny"))  # the folder holding the one file


def test_load_prefixed_diffusers_keys(model, tmp_path):
    file = tmp_path / "lightning.safetensors"
    save_file({"dit." + k: v.contiguous() for k, v in model.state_dict().items()}, file)
    with pytest.raises(ValueError, match="diffusers keys without a config; pass preset="):
        load_dit(file)
    _assert_same_weights(model, load_dit(file, preset="tiny"))


# --- round trips ------------------------------------------------------------------------------------------


def test_wan_round_trip_is_bit_identical(wan_sd, tmp_path):
    # Mixed dtypes as in real releases: must come back unchanged, name for name.
    original = {k: (v.to(torch.bfloat16) if "blocks.1." in k else v) for k, v in wan_sd.items()}
    src = tmp_path / "src.safetensors"
    save_file(original, src)
    loaded = load_dit(src, preset="tiny")
    for out in (tmp_path / "out.safetensors", tmp_path / "out_folder"):
        save_dit(loaded, out, "wan")
        file = out if out.suffix else out / "diffusion_pytorch_model.safetensors"
        back = load_file(file)
        assert sorted(back) == sorted(original)  # safetensors files have no key order
        for k, v in original.items():
            assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    # The single file is self-describing: no preset needed to load it again.
    with safe_open(tmp_path / "out.safetensors", "pt") as f:
        assert json.loads(f.metadata()["t3_config"])["t3_preset"] == "tiny"
    _assert_same_weights(loaded, load_dit(tmp_path / "out.safetensors"))


def test_save_tiny_dit_both_formats(model, tmp_path):
    for fmt in ("diffusers", "wan"):
        _assert_same_weights(model, load_dit(save_tiny_dit(tmp_path / fmt, fmt)))


def test_save_is_atomic(model, tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    save_dit(model, target, "wan")
    with pytest.raises(FileExistsError, match=str(target)):
        save_dit(model, target, "wan")

    import t3.models.dit as dit_module

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(dit_module, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_dit(tiny_dit(seed=1), target, "wan", overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        save_dit(model, tmp_path / "single.safetensors", "wan")
    monkeypatch.undo()

    # The failed saves left the old checkpoint intact and no temporary files behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    _assert_same_weights(model, load_dit(target))
    other = tiny_dit(seed=1)
    save_dit(other, target, "wan", overwrite=True)
    _assert_same_weights(other, load_dit(target))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_dtype_cast_keeps_fp32_modules(tmp_path, model):
    save_dit(model, tmp_path / "ckpt", "diffusers")
    m = load_dit(tmp_path / "ckpt", dtype="bf16")
    assert m.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert m.blocks[0].norm2.weight.dtype == torch.float32  # as diffusers' _keep_in_fp32_modules
    assert m.blocks[0].scale_shift_table.dtype == torch.float32
    assert torch.equal(m.blocks[0].attn1.to_q.weight, model.blocks[0].attn1.to_q.weight.bfloat16())


# --- refusals and errors ----------------------------------------------------------------------------------


def test_partial_checkpoints_are_refused_unless_allowed(model, wan_sd, tmp_path, caplog):
    sd = dict(wan_sd)
    del sd["blocks.2.cross_attn.k.weight"]
    sd["blocks.0.extra_adapter.weight"] = torch.zeros(3)
    file = tmp_path / "partial.safetensors"
    save_file(sd, file)

    with pytest.raises(CheckpointMismatchError) as err:
        load_dit(file, preset="tiny")
    msg = str(err.value)
    assert str(file) in msg and "1 missing key(s)" in msg and "1 unexpected key(s)" in msg
    assert "blocks.2.cross_attn.k.weight" in msg and "blocks.0.extra_adapter.weight" in msg  # file names
    assert "allow_partial=True" in msg

    with caplog.at_level(logging.WARNING, logger="t3.models.dit"):
        loaded = load_dit(file, preset="tiny", allow_partial=True)
    assert "1 missing, 1 unexpected" in caplog.text
    got, want = loaded.state_dict(), model.state_dict()
    for k in want:
        if k != "blocks.2.attn2.to_k.weight":
            assert torch.equal(got[k], want[k]), k
    missing = loaded.blocks[2].attn2.to_k.weight
    assert not missing.is_meta and torch.isfinite(missing).all() and missing.abs().sum() > 0


def test_shape_mismatch_names_key_shapes_and_file(wan_sd, tmp_path):
    sd = dict(wan_sd)
    sd["blocks.3.ffn.0.weight"] = torch.zeros(33, 24)
    file = tmp_path / "bad_shape.safetensors"
    save_file(sd, file)
    for allow_partial in (False, True):
        with pytest.raises(ValueError) as err:
            load_dit(file, preset="tiny", allow_partial=allow_partial)
        msg = str(err.value)
        assert str(file) in msg and "'blocks.3.ffn.0.weight'" in msg
        assert "expected (32, 24)" in msg and "found (33, 24)" in msg and "preset 'tiny'" in msg


def test_bad_paths_and_key_sets(tmp_path, wan_sd):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError) as err:
        load_dit(missing)
    assert str(err.value) == (
        f"DiT checkpoint not found: {missing} "
        "(expected a diffusers folder with config.json or Wan .safetensors files)"
    )

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .safetensors files in .*empty"):
        load_dit(tmp_path / "empty")

    pth = tmp_path / "model.pth"
    pth.write_bytes(b"")
    with pytest.raises(ValueError, match=r"model.pth: unsupported DiT checkpoint file"):
        load_dit(pth)

    foreign = tmp_path / "foreign.safetensors"
    save_file({"encoder.layer.0.weight": torch.zeros(2), "decoder.bias": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match="foreign.safetensors: keys are neither original Wan nor diffusers"):
        load_dit(foreign, preset="tiny")

    with pytest.raises(ValueError, match=r"Unknown model preset 'big'.*'wan2.2-ti2v-5b'"):
        load_dit(missing, preset="big")  # checked before touching the path


def test_wrong_preset_reports_shape(wan_sd, tmp_path):
    file = tmp_path / "wan.safetensors"
    save_file(wan_sd, file)
    # The AdaLN table of the head is the first parameter in the model's order.
    with pytest.raises(
        ValueError, match=r"shape mismatch for 'head.modulation': expected \(1, 2, 1536\) .*more\)"
    ):
        load_dit(file, preset="wan2.1-t2v-1.3b")


def test_unknown_config_asks_for_preset(wan_sd, tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_file(wan_sd, folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match=r"config.json is neither .* pass preset="):
        load_dit(folder)
    # A Wan release config (no t3 fields) is enough on its own.
    release = {"_class_name": "WanModel", "dim": 24, "num_heads": 2, "num_layers": 5, "ffn_dim": 32}
    release |= {"freq_dim": 16, "in_dim": 4, "out_dim": 4, "text_dim": 16, "model_type": "t2v", "eps": 1e-6}
    (folder / "config.json").write_text(json.dumps(release))
    m = load_dit(folder)
    assert m.config.num_layers == 5 and m.config.attention_head_dim == 12


def test_loaded_model_matches_file_even_without_grad(model, tmp_path: Path):
    # Guards the meta-device path: non-persistent RoPE buffers must be real tensors after loading.
    save_dit(model, tmp_path / "ckpt", "diffusers")
    loaded = load_dit(tmp_path / "ckpt")
    assert not loaded.rope.freqs_cos.is_meta
    assert torch.equal(loaded.rope.freqs_cos, model.rope.freqs_cos)


# --- build: dtype names, preset DiTs, fp32-keeping casts --------------------------------------------------


def test_dtype_names_and_aliases():
    from t3.models.build import as_dtype

    assert as_dtype("bf16") is as_dtype("torch.bfloat16") is as_dtype("BFloat16") is torch.bfloat16
    assert (
        as_dtype("half") is torch.float16
        and as_dtype(None) is None
        and as_dtype(torch.float32) is torch.float32
    )
    with pytest.raises(ValueError, match=r"unknown dtype 'int8'; expected a torch.dtype or one of \["):
        as_dtype("int8")


def test_dit_from_preset_is_seeded_and_leaves_the_global_rng_alone():
    from t3.models.build import dit_from_preset

    state = torch.random.get_rng_state()
    a, b = dit_from_preset("tiny", seed=3), dit_from_preset("tiny", seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    meta = dit_from_preset("wan2.1-t2v-1.3b", device="meta", num_layers=2)
    assert len(meta.blocks) == 2 and next(meta.parameters()).is_meta


def test_cast_dit_keeps_the_fp32_modules():
    from t3.models.build import cast_dit

    model = tiny_dit()
    assert cast_dit(model, torch.bfloat16)
    assert model.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert model.blocks[0].norm2.weight.dtype == torch.float32  # in diffusers' _keep_in_fp32_modules
    assert not cast_dit(model, torch.bfloat16)  # nothing left to cast

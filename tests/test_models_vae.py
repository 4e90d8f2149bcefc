"""Wan VAE: local loading, latent normalisation, tiled vs untiled encode/decode."""

from __future__ import annotations

import pytest
import torch

from t3.models import decode_latents, denormalize_latents, encode_video, load_vae, normalize_latents
from t3.models.tiny import TINY_VAE_CONFIG, save_tiny_vae, tiny_vae


def _spatially_local(vae):
    """Make every output pixel depend only on its own latent position (and time), and vice versa.

    A random VAE mixes the whole frame (3x3 convs at every scale plus a global attention in the middle block),
    so tiles can only approximate the full decode. With centre-tap-only kernels and no attention, tiling is
    exact, which isolates what we test: tile geometry, overlap blending, cropping and clamping.
    """
    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, torch.nn.Conv2d | torch.nn.Conv3d) and module.weight.shape[-1] > 1:
                kh, kw = module.weight.shape[-2:]
                centre = module.weight[..., kh // 2, kw // 2].clone()
                module.weight.zero_()
                module.weight[..., kh // 2, kw // 2] = centre
            if type(module).__name__ == "WanAttentionBlock":
                module.proj.weight.zero_()
                module.proj.bias.zero_()
    return vae


def _count_calls(module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_load_vae(tmp_path):
    save_tiny_vae(tmp_path / "vae")
    vae = load_vae(tmp_path / "vae")
    ref = tiny_vae()
    assert vae.config.z_dim == TINY_VAE_CONFIG["z_dim"] and not vae.training
    for (k, a), (_, b) in zip(vae.state_dict().items(), ref.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert load_vae(tmp_path, dtype=torch.bfloat16).dtype == torch.bfloat16  # pipeline folder: vae/

    with pytest.raises(FileNotFoundError, match=f"VAE not found: {tmp_path / 'nope'} .*AutoencoderKLWan"):
        load_vae(tmp_path / "nope")


def test_latent_normalisation_matches_pipeline():
    vae = tiny_vae()
    z = torch.randn(2, 4, 3, 4, 4)
    mean = torch.tensor(TINY_VAE_CONFIG["latents_mean"]).view(1, 4, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(TINY_VAE_CONFIG["latents_std"]).view(1, 4, 1, 1, 1)
    normed = normalize_latents(vae, z)
    torch.testing.assert_close(normed, (z - mean) * inv_std)  # WanVideoToVideoPipeline.prepare_latents
    torch.testing.assert_close(denormalize_latents(vae, normed), z)  # WanPipeline decode: z / inv_std + mean


def test_tiled_decode_and_encode_agree_with_untiled():
    vae = _spatially_local(tiny_vae())
    calls = _count_calls(vae.decoder)
    # Two latent frames (5 video frames) of 48 x 48 pixels: tiling is spatial, time runs through the causal
    # cache as usual.
    latents = torch.randn(1, 4, 2, 6, 6, generator=torch.Generator().manual_seed(0))

    full = decode_latents(vae, latents, tiled=False)
    assert calls[0] == 2  # one decoder call per latent frame
    # 32-pixel tiles every 16 pixels: 3 x 3 overlapping tiles.
    tiled = decode_latents(vae, latents, tiled=True, tile_size=32, tile_stride=16)
    assert calls[0] == 2 + 9 * 2
    assert tiled.shape == full.shape == (1, 3, 5, 48, 48)
    assert full.abs().mean() > 0.01
    torch.testing.assert_close(tiled, full, atol=1e-5, rtol=0)

    video = torch.rand(1, 3, 1, 48, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z_full = encode_video(vae, video, tiled=False)
    z_tiled = encode_video(vae, video, tiled=True, tile_size=32, tile_stride=16)
    assert z_full.shape == (1, 4, 1, 6, 6)
    torch.testing.assert_close(z_tiled, z_full, atol=1e-5, rtol=0)

    # The VAE's own settings are restored after each call.
    assert (
        vae.use_tiling is False and vae.tile_sample_min_height == 256 and vae.tile_sample_stride_width == 192
    )


def test_tiled_decode_of_random_vae_is_close():
    # Without the locality trick tiles see less context, so agreement is only approximate.
    vae = tiny_vae()
    latents = torch.randn(1, 4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    full = decode_latents(vae, latents, tiled=False)
    tiled = decode_latents(vae, latents, tiled=True, tile_size=48, tile_stride=32)
    assert tiled.shape == full.shape and tiled.abs().max() <= 1.0
    assert (tiled - full).abs().mean() < 0.25 * full.abs().mean()


def test_encode_decode_round_trip_shapes():
    vae = tiny_vae()
    video = torch.rand(2, 3, 5, 16, 24) * 2 - 1
    latents = encode_video(vae, video, tiled=False, sample=True, generator=torch.Generator().manual_seed(0))
    assert latents.shape == (2, 4, 2, 2, 3)
    raw = encode_video(vae, video, tiled=False, normalize=False)
    torch.testing.assert_close(normalize_latents(vae, raw), encode_video(vae, video, tiled=False))
    assert decode_latents(vae, latents).shape == video.shape

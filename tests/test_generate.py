"""Text-to-video generation and video I/O with tiny models (CPU, a few seconds).

The tiny DiT, VAE and text encoder are saved into a temporary folder once per module and loaded back through
the public loaders (`load_dit`, `load_vae`, `load_text_encoder`), as a user would. 64x64 pixels and 5 frames
give latents ``[4, 2, 8, 8]`` and a token grid ``(2, 4, 4)``, on which the test T3 schedule really windows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from t3.attention import PlanError, build_schedule
from t3.generate import (
    WAN_NEGATIVE_PROMPT,
    T2VGenerator,
    generate,
    video_file_name,
)
from t3.models import get_spec, load_dit, load_text_encoder, load_vae
from t3.models.tiny import save_tiny_dit, save_tiny_text_encoder, save_tiny_vae
from t3.video_io import VideoIOError, read_video, video_info, write_video
from t3.wan_pipeline import make_wan_pipeline

SIZE = {"height": 64, "width": 64, "frames": 5}
FAST = {"steps": 3, "progress": False}
PROMPTS = ["a red cat", "a dog in the city"]


def t3_schedule():
    """Alternates temporal slices and 2x2x2 windows: a real split of the (2, 4, 4) tiny grid."""
    return build_schedule("tiny", windows=[[1, None, None], [None, 2, 2]])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny_models")
    save_tiny_dit(root / "dit")
    save_tiny_vae(root / "vae")
    save_tiny_text_encoder(root / "text_encoder")
    return root


@pytest.fixture(scope="module")
def text_encoder(model_dir):
    return load_text_encoder(model_dir / "text_encoder")


def make_generator(model_dir: Path, text_encoder, schedule="dense", **kwargs) -> T2VGenerator:
    # A fresh DiT each time: T2VGenerator transforms it in place.
    return T2VGenerator(
        load_dit(model_dir / "dit"),
        load_vae(model_dir / "vae"),
        text_encoder,
        spec="tiny",
        schedule=schedule,
        **kwargs,
    )


@pytest.fixture
def generator(model_dir, text_encoder) -> T2VGenerator:
    return make_generator(model_dir, text_encoder, t3_schedule())


def count_dit_calls(gen: T2VGenerator) -> list[int]:
    calls = [0]

    def hook(module, args):
        calls[0] += 1

    gen.dit.register_forward_pre_hook(hook)
    return calls


# --- size checks ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["wan2.1-t2v-1.3b", "wan2.2-ti2v-5b"])
def test_authors_4k_size_is_valid(preset):
    get_spec(preset).check_video_size(81, 2176, 3840)
    get_spec(preset).check_video_size(121, 704, 1280)


@pytest.mark.parametrize(
    ("size", "preset", "message"),
    [
        # 2160 (UHD) is fine for Wan2.1 (16 | 2160) but not for Wan2.2's 32.
        (
            (2160, 3840, 81),
            "wan2.2-ti2v-5b",
            "height 2160 is not a multiple of 32 for wan2.2-ti2v-5b; nearest valid: 2144 or 2176",
        ),
        (
            (2170, 3840, 81),
            "wan2.1-t2v-1.3b",
            "height 2170 is not a multiple of 16 for wan2.1-t2v-1.3b; nearest valid: 2160 or 2176",
        ),
        (
            (2176, 1000, 81),
            "wan2.2-ti2v-5b",
            "width 1000 is not a multiple of 32 for wan2.2-ti2v-5b; nearest valid: 992 or 1024",
        ),
        (
            (720, 1280, 81),
            "wan2.2-ti2v-5b",
            "height 720 is not a multiple of 32 .* nearest valid: 704 or 736",
        ),
        ((64, 64, 80), "tiny", "frames 80 is not of the form 4k\\+1 for tiny; nearest valid: 77 or 81"),
        ((8, 64, 5), "tiny", "height 8 is not a multiple of 16 for tiny; nearest valid: 16$"),
        ((0, 64, 5), "tiny", "height must be a positive integer, got 0"),
    ],
)
def test_invalid_sizes_name_the_nearest_valid_ones(size, preset, message):
    with pytest.raises(ValueError, match=message):
        height, width, frames = size
        get_spec(preset).check_video_size(frames, height, width)


def test_invalid_size_fails_before_any_model_work(generator, tmp_path):
    calls = count_dit_calls(generator)
    with pytest.raises(ValueError, match="nearest valid: 48 or 64"):
        generate(
            PROMPTS, generator=generator, height=60, width=64, frames=5, out_dir=tmp_path / "out", **FAST
        )
    assert calls[0] == 0
    assert generator.embedding_cache.misses == 0
    assert not (tmp_path / "out").exists()


def test_schedule_that_does_not_fit_the_grid_fails_early(model_dir, text_encoder):
    gen = make_generator(model_dir, text_encoder, build_schedule("bad", pieces=[[3, 1, 1]]))
    with pytest.raises(PlanError):
        generate(PROMPTS, generator=gen, **SIZE, **FAST)
    assert gen.embedding_cache.misses == 0


def test_generator_rejects_a_dit_of_another_model(model_dir, text_encoder):
    with pytest.raises(ValueError, match="does not match model spec wan2.1-t2v-1.3b"):
        T2VGenerator(load_dit(model_dir / "dit"), None, text_encoder, spec="wan2.1-t2v-1.3b")


# --- generation -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["dense", "t3"])
def test_generate_writes_readable_videos(model_dir, text_encoder, tmp_path, schedule):
    gen = make_generator(model_dir, text_encoder, t3_schedule() if schedule == "t3" else "dense")
    out = tmp_path / "videos" / schedule  # created by generate
    results = generate(PROMPTS, generator=gen, **SIZE, **FAST, seed=7, fps=8, out_dir=out)

    assert [r.prompt for r in results] == PROMPTS
    assert [r.seed for r in results] == [7, 8]
    assert sorted(p.name for p in out.iterdir()) == [video_file_name(0, 7), video_file_name(1, 8)]
    for r in results:
        assert r.video_path is not None and r.video_path.parent == out
        assert r.latents is None and r.frames is None
        assert r.timings.denoising > 0 and r.timings.decode > 0 and r.timings.write > 0
        frames = read_video(r.video_path)  # decord
        assert frames.shape == (5, 64, 64, 3) and frames.dtype == np.uint8
        info = video_info(r.video_path)
        assert (info.frames, info.height, info.width) == (5, 64, 64) and info.fps == pytest.approx(8.0)


def test_generate_without_out_dir_returns_frames(generator):
    (result,) = generate("a cat", generator=generator, **SIZE, **FAST, return_latents=True)
    assert result.frames.shape == (5, 64, 64, 3) and result.frames.dtype == np.uint8
    assert result.latents.shape == (4, 2, 8, 8) and result.video_path is None


def test_seeds_are_reproducible_and_independent_of_batch_size(generator):
    def latents(seed: int, batch_size: int = 1) -> list[torch.Tensor]:
        results = generate(
            PROMPTS, generator=generator, **SIZE, **FAST, seed=seed, latents_only=True, batch_size=batch_size
        )
        return [r.latents for r in results]

    first, again, other = latents(3), latents(3), latents(4)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])
    # Seed 4 is prompt 1's seed under seed 3, but with prompt 0's text: same noise, different prompt.
    assert not torch.equal(first[1], other[0])
    # Batching changes only float rounding in the DiT, never the noise.
    batched = latents(3, batch_size=2)
    for a, b in zip(first, batched, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_latents_only_writes_nothing(generator, tmp_path):
    calls = count_dit_calls(generator)
    out = tmp_path / "out"
    results = generate(PROMPTS, generator=generator, **SIZE, **FAST, out_dir=out, latents_only=True)
    assert not out.exists()
    assert calls[0] == 2 * 3  # two batches, one forward per step each (CFG batched)
    for r in results:
        assert r.latents.shape == (4, 2, 8, 8) and r.latents.dtype == torch.float32
        assert r.video_path is None and r.frames is None
        assert r.timings.decode == 0 and r.timings.write == 0


def test_bad_output_folder_fails_before_model_work(generator, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    with pytest.raises(NotADirectoryError, match="a_file exists and is not a folder"):
        generate(PROMPTS, generator=generator, **SIZE, **FAST, out_dir=a_file)
    with pytest.raises(OSError, match="cannot write videos to out_dir .*a_file/videos"):
        generate(PROMPTS, generator=generator, **SIZE, **FAST, out_dir=a_file / "videos")
    assert generator.embedding_cache.misses == 0


def test_embedding_cache_encodes_each_prompt_once(generator, monkeypatch):
    encoded: list[str] = []
    original = generator.text_encoder.encode

    def counting_encode(prompts, *args, **kwargs):
        encoded.extend(prompts)
        return original(prompts, *args, **kwargs)

    monkeypatch.setattr(generator.text_encoder, "encode", counting_encode)
    generate(PROMPTS, generator=generator, **SIZE, **FAST, latents_only=True)
    generate([PROMPTS[1], "a blue video", PROMPTS[1]], generator=generator, **SIZE, **FAST, latents_only=True)
    assert sorted(encoded) == sorted([*PROMPTS, WAN_NEGATIVE_PROMPT, "a blue video"])


def test_no_guidance_skips_the_negative_prompt(generator):
    calls = count_dit_calls(generator)
    generate("a cat", generator=generator, **SIZE, **FAST, guidance_scale=1.0, latents_only=True)
    assert calls[0] == 3
    assert WAN_NEGATIVE_PROMPT not in generator.embedding_cache


def test_negative_prompt_is_the_standard_wan_one():
    assert WAN_NEGATIVE_PROMPT.startswith("色调艳丽，过曝，静态，细节模糊不清")
    assert WAN_NEGATIVE_PROMPT.endswith("三条腿，背景人很多，倒着走")


# --- diffusers interoperability ---------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler", ["unipc", "diffsynth_euler"])
def test_wan_pipeline_with_t3_dit_matches_generate(model_dir, text_encoder, scheduler):
    gen = make_generator(model_dir, text_encoder, t3_schedule(), scheduler=scheduler)
    (ours,) = generate("a red cat", generator=gen, **SIZE, **FAST, seed=5, latents_only=True)

    pipe = make_wan_pipeline(
        load_dit(model_dir / "dit"), load_vae(model_dir / "vae"), model_dir / "text_encoder", scheduler,
        schedule=t3_schedule(),
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    call = {
        "prompt": "a red cat",
        "negative_prompt": WAN_NEGATIVE_PROMPT,
        "height": 64,
        "width": 64,
        "num_frames": 5,
        "guidance_scale": 5.0,
    }
    latents = pipe(
        **call, num_inference_steps=3, generator=torch.Generator().manual_seed(5), output_type="latent"
    ).frames
    # Same noise, embeddings and scheduler; only the CFG batching differs (float rounding).
    torch.testing.assert_close(latents[0], ours.latents, rtol=1e-4, atol=1e-4)

    video = pipe(**call, num_inference_steps=2, output_type="np").frames
    assert video.shape == (1, 5, 64, 64, 3)


# --- video I/O --------------------------------------------------------------------------------------------


def gradient_video(frames: int = 5, height: int = 32, width: int = 48) -> np.ndarray:
    """A smooth moving gradient: compresses well, so a round trip stays close."""
    t, y, x = np.meshgrid(np.arange(frames), np.arange(height), np.arange(width), indexing="ij")
    red = (x * 4 + t * 8) % 256
    green = (y * 6) % 256
    blue = np.full_like(red, 128)
    return np.stack([red, green, blue], axis=-1).astype(np.uint8)


def test_video_round_trip(tmp_path):
    frames = gradient_video()
    path = write_video(tmp_path / "clip.mp4", torch.from_numpy(frames), fps=12)
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]  # no temporary file left
    back = read_video(path)
    assert back.shape == frames.shape and back.dtype == np.uint8
    assert np.abs(back.astype(int) - frames.astype(int)).mean() < 6
    info = video_info(path)
    assert (info.frames, info.height, info.width) == (5, 32, 48) and info.fps == pytest.approx(12)


def test_pyav_fallback_reads_the_same_frames(tmp_path, monkeypatch):
    import t3.video_io as vio

    path = write_video(tmp_path / "clip.mp4", gradient_video(), fps=12)
    with_decord = read_video(path)

    def broken(*args):
        raise RuntimeError("decord unavailable")

    monkeypatch.setattr(vio, "_open_decord", broken)
    np.testing.assert_array_equal(read_video(path), with_decord)


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    import av

    target = tmp_path / "clip.mp4"
    target.write_bytes(b"previous complete video")

    def failing(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(av.VideoFrame, "from_ndarray", failing)
    with pytest.raises(VideoIOError, match="clip.mp4.*disk full"):
        write_video(target, gradient_video(), fps=12)
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]
    assert target.read_bytes() == b"previous complete video"  # the old file is untouched


def test_video_io_errors_name_the_file(tmp_path):
    frames = gradient_video()
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        write_video(tmp_path / "no_such_dir" / "clip.mp4", frames, fps=12)
    with pytest.raises(ValueError, match="clip.mp4: frames must be uint8"):
        write_video(tmp_path / "clip.mp4", frames.astype(np.float32), fps=12)
    with pytest.raises(ValueError, match="must be even"):
        write_video(tmp_path / "clip.mp4", gradient_video(height=31), fps=12)
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        read_video(tmp_path / "missing.mp4")
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"this is not a video")
    with pytest.raises(VideoIOError, match="garbage.mp4"):
        read_video(garbage)
    with pytest.raises(VideoIOError, match="garbage.mp4"):
        video_info(garbage)


def test_generate_refuses_beyond_the_rope_table_and_the_free_memory(model_dir, text_encoder, monkeypatch):
    import t3.memory
    from t3.memory import DoesNotFitError

    gen = make_generator(model_dir, text_encoder)
    with pytest.raises(
        ValueError, match="covers at most 32 positions per axis .* height and width at most 512"
    ):
        generate(PROMPTS, generator=gen, height=64, width=1024, frames=5, **FAST)
    monkeypatch.setattr(t3.memory, "available_memory", lambda device: (1000, "available host memory"))
    with pytest.raises(
        DoesNotFitError, match=r"^generate: .* batch 4, float32\) needs at least 0.0 GiB of act"
    ):
        generate(PROMPTS, generator=gen, batch_size=2, **SIZE, **FAST)

"""Clip decoding: frame selection at a target fps, resize + centre crop, and typed errors for bad videos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from t3.data.video import (
    TooFewFramesError,
    UnreadableVideoError,
    VideoTooSmallError,
    clip_frame_indices,
    load_clip,
    read_clip,
    resize_crop,
)
from t3.video_io import write_video

SOURCE_FPS = 30


@pytest.fixture(scope="module")
def ramp_video(tmp_path_factory) -> Path:
    """30 frames at 30 fps, 48x64, frame i a flat grey of brightness 8 * i (readable back from the pixels)."""
    frames = np.zeros((30, 48, 64, 3), dtype=np.uint8)
    for i in range(30):
        frames[i] = 8 * i
    return write_video(tmp_path_factory.mktemp("video") / "ramp.mp4", frames, fps=SOURCE_FPS, crf=0)


def _frame_levels(video: torch.Tensor) -> list[float]:
    """Mean brightness (0-255) of each frame of a ``[3, F, H, W]`` clip in [-1, 1]."""
    return [round(((f.mean().item() + 1) * 127.5) / 8) for f in video.unbind(1)]


def test_frames_are_sampled_at_the_target_fps(ramp_video: Path):
    clip = read_clip(ramp_video, num_frames=5, height=48, width=64, target_fps=10)
    assert clip.frame_indices == [0, 3, 6, 9, 12]
    assert clip.video.shape == (3, 5, 48, 64) and clip.video.dtype == torch.float32
    assert clip.video.min() >= -1 and clip.video.max() <= 1
    assert _frame_levels(clip.video) == [0, 3, 6, 9, 12]
    assert (clip.fps, clip.source_fps, clip.source_frames) == (10, SOURCE_FPS, 30)


def test_start_time_and_source_rate(ramp_video: Path):
    video = load_clip(ramp_video, num_frames=9, height=48, width=64, start=0.5)
    assert _frame_levels(video) == list(range(15, 24))


def test_pyav_fallback_gives_the_same_frames(ramp_video: Path):
    kwargs = dict(num_frames=5, height=32, width=32, target_fps=15)
    decord_clip = read_clip(ramp_video, backend="decord", **kwargs)
    pyav_clip = read_clip(ramp_video, backend="pyav", **kwargs)
    assert pyav_clip.backend == "pyav" and decord_clip.backend == "decord"
    assert pyav_clip.frame_indices == decord_clip.frame_indices == [0, 2, 4, 6, 8]
    torch.testing.assert_close(pyav_clip.video, decord_clip.video, atol=2 / 255, rtol=0)


def test_frame_indices_nearest():
    assert clip_frame_indices(5, source_fps=24, target_fps=16) == [0, 2, 3, 5, 6]
    assert clip_frame_indices(3, source_fps=10, target_fps=20) == [0, 1, 1]  # slower source: repeat
    assert clip_frame_indices(3, source_fps=25, start=1.0) == [25, 26, 27]


def test_resize_keeps_aspect_and_crops_the_centre():
    # Pixel value = column index: after a centre crop of the middle 48 of 64 columns and a resize,
    # the mean is the middle column and the edges come from columns 8 and 55.
    columns = torch.arange(64, dtype=torch.float32).expand(1, 3, 48, 64)
    out = resize_crop(columns, 32, 32)
    assert out.shape == (1, 3, 32, 32)
    assert out.mean().item() == pytest.approx(31.5, abs=0.01)
    assert 8 <= out.min().item() < 10 and 54 < out.max().item() <= 55
    tall = resize_crop(torch.zeros(2, 3, 100, 40, dtype=torch.uint8), 16, 32)
    assert tall.shape == (2, 3, 16, 32) and tall.dtype == torch.float32


def test_errors_carry_a_reason(ramp_video: Path, tmp_path: Path):
    with pytest.raises(TooFewFramesError) as err:
        load_clip(ramp_video, num_frames=17, height=48, width=64, target_fps=10)  # needs frame 48 of 30
    assert err.value.reason == "too_few_frames" and "ramp.mp4" in str(err.value)

    with pytest.raises(VideoTooSmallError) as err:
        load_clip(ramp_video, num_frames=5, height=64, width=64)
    assert err.value.reason == "too_small"
    assert load_clip(ramp_video, num_frames=5, height=64, width=64, max_upscale=2.0).shape == (3, 5, 64, 64)

    truncated = tmp_path / "truncated.mp4"
    data = ramp_video.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(UnreadableVideoError) as err:
        load_clip(truncated, num_frames=5, height=32, width=32)
    assert err.value.reason == "unreadable"

    with pytest.raises(UnreadableVideoError, match="not found"):
        load_clip(tmp_path / "nope.mp4", num_frames=5, height=32, width=32)


def test_bad_arguments_are_value_errors(ramp_video: Path):
    with pytest.raises(ValueError, match="4k \\+ 1"):
        load_clip(ramp_video, num_frames=6, height=32, width=32)
    with pytest.raises(ValueError, match="target_fps"):
        load_clip(ramp_video, num_frames=5, height=32, width=32, target_fps=0)


def test_auto_falls_back_to_pyav_when_decord_fails(ramp_video: Path, monkeypatch):
    import t3.video_io

    def broken(*args):
        raise RuntimeError("decord cannot open this")

    monkeypatch.setattr(t3.video_io, "_open_decord", broken)
    clip = read_clip(ramp_video, num_frames=5, height=32, width=32, target_fps=10)
    assert clip.backend == "pyav" and clip.frame_indices == [0, 3, 6, 9, 12]

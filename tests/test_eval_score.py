"""The eval scoring stage with tiny feature extractors built here (CPU, offline).

* a tiny TorchScript module with the I3D detector's call signature stands in for ``i3d_torchscript.pt``;
* a tiny ``CLIPModel`` with an offline-built tokenizer and image processor stands in for a CLIP folder.

They make the plumbing testable; the Fréchet computation itself is checked against independent float64
computations (scipy's ``sqrtm`` and a symmetric eigen-decomposition) on fixed features.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from t3.eval import run
from t3.eval.metrics import FrechetVideoDistance
from t3.eval.metrics.fvd import DETECTOR_KWARGS, clip_indices, random_tiles, resized_clip, tile_positions
from t3.eval.prompts import load_prompts
from t3.io import sha256_file
from t3.video_io import read_frames, write_video

from .conftest import PROMPT_LISTS
from .test_eval_generate import compose_eval

NUM_PROMPTS = 5
FRAMES = 17  # >= the 16-frame FVD clip
SIZE = 256  # >= the 224-pixel FVD tiles


class TinyI3D(nn.Module):
    """The I3D detector's call signature on a conv + pooling + linear net with 400 outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(3, 8, kernel_size=3, stride=(2, 8, 8))
        self.head = nn.Linear(16, 400)

    def forward(
        self, x: torch.Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False
    ) -> torch.Tensor:
        if rescale or resize:
            raise RuntimeError("t3 must call the detector with rescale=False, resize=False")
        h = torch.relu(self.conv(x))
        h = torch.cat([h.mean(dim=(2, 3, 4)), h.amax(dim=(2, 3, 4))], dim=1)
        out = self.head(h)
        return out if return_features else torch.softmax(out, dim=-1)


class Identity(nn.Module):
    """Features in, features out: to feed fixed features through the metric."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@pytest.fixture(scope="module")
def i3d_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("i3d") / "i3d_torchscript.pt"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.jit.script(TinyI3D().eval()).save(str(path))
    return path


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    path = tmp_path_factory.mktemp("clip")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in string.ascii_lowercase + string.digits + string.punctuation:
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    config = CLIPConfig(
        text_config={
            "vocab_size": len(vocab), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 77, "bos_token_id": 0, "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=8,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        CLIPModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        path
    )
    return path


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory) -> tuple[Path, Path]:
    return write_scored_run(tmp_path_factory.mktemp("score"))


def write_scored_run(root: Path) -> tuple[Path, Path]:
    """Five complete 'generated' videos (mp4 + record) and their five reference videos."""
    out, data_root = root / "run", root / "data"
    out.mkdir()
    rng = np.random.default_rng(0)
    for entry in load_prompts(PROMPT_LISTS / "4k_vbench.json", limit=NUM_PROMPTS):
        ref = data_root / entry.data_file
        ref.parent.mkdir(parents=True, exist_ok=True)
        write_video(ref, rng.integers(0, 256, (FRAMES, SIZE, SIZE, 3), dtype=np.uint8), fps=16)
        video = out / f"video_{entry.index:05d}_seed0.mp4"
        # Labelled 30 fps like the authors' videos; the content is at the tiny model's 16 fps.
        write_video(video, rng.integers(64, 192, (FRAMES, SIZE, SIZE, 3), dtype=np.uint8), fps=30)
        record = {"frames": FRAMES, "prompt": entry.prompt, "fps": 30, "content_fps": 16}
        video.with_suffix(".json").write_text(json.dumps(record))
    return out, data_root


def score_overrides(out: Path, *extra: str) -> list[str]:
    return [
        "stage=score",
        "model=tiny",
        "benchmark=tiny",
        f"benchmark.prompts={PROMPT_LISTS / '4k_vbench.json'}",
        f"out_dir={out}",
        "wandb.enabled=false",
        *extra,
    ]


# --- Fréchet distance -------------------------------------------------------------------------------------


def frechet_scipy(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook formula with scipy's matrix square root (float64, unbiased covariances)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root, _ = scipy.linalg.sqrtm(cov_a @ cov_b, disp=False)
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2 * root.real))


def frechet_eigh(a: np.ndarray, b: np.ndarray) -> float:
    """The same via symmetric eigen-decompositions: tr sqrt(Ca Cb) = sum sqrt(eig(Ca^1/2 Cb Ca^1/2)).

    Stable for the rank-deficient covariances of few samples in many dimensions.
    """
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    return float(
        np.sum((mu_a - mu_b) ** 2)
        + np.trace(cov_a)
        + np.trace(cov_b)
        - 2 * np.sqrt(np.clip(inner, 0, None)).sum()
    )


def test_frechet_distance_matches_scipy_on_fixed_features():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6))
    fake = rng.normal(loc=0.5, size=(250, 6)) @ rng.normal(size=(6, 6))
    metric = FrechetVideoDistance(Identity(6))
    for chunk in np.array_split(real, 3):  # batches accumulate like one pass
        metric.update(torch.from_numpy(chunk), real=True)
    metric.update(torch.from_numpy(fake), real=False)
    expected = frechet_scipy(real, fake)
    assert float(metric.compute()) == pytest.approx(expected, rel=1e-9)
    assert frechet_eigh(real, fake) == pytest.approx(expected, rel=1e-9)


def test_frechet_states_from_two_processes_merge_to_the_single_process_value():
    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(40, 4)), rng.normal(loc=1.0, size=(30, 4))
    whole, part_a, part_b = (FrechetVideoDistance(Identity(4)) for _ in range(3))
    whole.update(torch.from_numpy(real), real=True)
    whole.update(torch.from_numpy(fake), real=False)
    part_a.update(torch.from_numpy(real[:25]), real=True)
    part_a.update(torch.from_numpy(fake[:10]), real=False)
    part_b.update(torch.from_numpy(real[25:]), real=True)
    part_b.update(torch.from_numpy(fake[10:]), real=False)
    part_a.merge_state(part_b)  # what the "sum" reduction does across ranks
    assert float(part_a.compute()) == pytest.approx(float(whole.compute()), rel=1e-12)


# --- the stage end to end ---------------------------------------------------------------------------------


def test_scoring_end_to_end_with_tiny_extractors(scored_run, i3d_path, clip_dir):
    out, data_root = scored_run
    report = run(compose_eval(*score_overrides(
        out,
        f"benchmark.data_root={data_root}",
        f"metrics.fvd_i3d.weights={i3d_path}",
        f"metrics.fvd_i3d.sha256={sha256_file(i3d_path)}",
        f"metrics.vtc_clip.weights={clip_dir}",
        "metrics.fvd_i3d_crop224.tiles_per_video=2",
        "wandb.enabled=true",
    )))  # fmt: skip
    assert json.loads((out / "results.json").read_text()) == report
    m = report["metrics"]
    assert list(m) == [
        "fvd_i3d", "fvd_i3d_crop224", "vtc_clip", "vtc_viclip", "vqa_dover", "vqa_dover_technical",
        "vqa_dover_aesthetic",
    ]  # fmt: skip
    assert report["videos"] == {"expected": 5, "complete": 5, "missing": []}
    assert "none is claimed to be the T3 paper's number" in report["note"]

    # fvd_i3d equals an independent computation on the same clips through the same detector.
    detector = torch.jit.load(str(i3d_path))
    entries = load_prompts(PROMPT_LISTS / "4k_vbench.json", limit=NUM_PROMPTS)

    def features(paths: list[Path]) -> np.ndarray:
        clips = torch.stack([resized_clip(read_frames(p, range(16))) for p in paths])
        with torch.no_grad():
            return detector(clips, **DETECTOR_KWARGS).double().numpy()

    gen = features([out / f"video_{e.index:05d}_seed0.mp4" for e in entries])
    ref = features([data_root / e.data_file for e in entries])
    assert m["fvd_i3d"]["status"] == "ok"
    assert m["fvd_i3d"]["value"] == pytest.approx(frechet_eigh(ref, gen), rel=1e-4)
    assert (m["fvd_i3d"]["num_generated"], m["fvd_i3d"]["num_reference"]) == (5, 5)
    assert m["fvd_i3d"]["protocol"]["detector_sha256"] == sha256_file(i3d_path)
    assert m["fvd_i3d"]["protocol"]["fps"] == 16
    assert m["fvd_i3d"]["protocol"]["source_fps"] == {"generated": {"16": 5}, "reference": {"16": 5}}
    assert m["fvd_i3d"]["protocol"]["detector_kwargs"] == {
        "rescale": False,
        "resize": False,
        "return_features": True,
    }

    assert m["fvd_i3d_crop224"]["status"] == "ok" and m["fvd_i3d_crop224"]["value"] > 0
    assert (m["fvd_i3d_crop224"]["num_generated"], m["fvd_i3d_crop224"]["num_reference"]) == (10, 10)

    assert m["vtc_clip"]["status"] == "ok" and -1 <= m["vtc_clip"]["value"] <= 1
    assert sorted(m["vtc_clip"]["per_video"]) == [f"video_{i:05d}_seed0.mp4" for i in range(5)]
    assert m["vtc_clip"]["value"] == pytest.approx(np.mean(list(m["vtc_clip"]["per_video"].values())))
    assert m["vtc_clip"]["protocol"]["prompts_truncated"] >= 1  # 4K-VBench prompts exceed 77 tokens

    assert m["vtc_viclip"]["status"] == m["vqa_dover"]["status"] == "skipped"  # no checkouts given
    table = (out / "results.md").read_text()
    assert "| `fvd_i3d` |" in table and "| `vqa_dover` | - |" in table
    assert list((out / "wandb").glob("offline-run-*")), "no offline wandb run was written"


def test_missing_weights_give_the_documented_skip_messages(scored_run, i3d_path):
    out, _ = scored_run
    report = run(compose_eval(*score_overrides(out, "metrics.vtc_clip.weights=/no/such/clip")))
    m = report["metrics"]
    assert m["fvd_i3d"]["message"] == "fvd_i3d: skipped: no weights (metrics.fvd_i3d.weights is null)"
    assert (
        m["fvd_i3d_crop224"]["message"]
        == "fvd_i3d_crop224: skipped: no weights (metrics.fvd_i3d.weights is null)"
    )
    assert (
        m["vtc_clip"]["message"]
        == "vtc_clip: skipped: weights not found at /no/such/clip (metrics.vtc_clip.weights)"
    )
    assert all(v["status"] == "skipped" and v["value"] is None for v in m.values())

    no_refs = run(compose_eval(*score_overrides(out, f"metrics.fvd_i3d.weights={i3d_path}")))
    assert no_refs["metrics"]["fvd_i3d"]["message"] == (
        "fvd_i3d: skipped: no reference videos (benchmark.data_root is null or the prompts have no data_file)"
    )


def test_scoring_rejects_wrong_weights_missing_references_and_incomplete_runs(scored_run, i3d_path, tmp_path):
    out, data_root = scored_run
    with pytest.raises(ValueError, match=r"sha256 [0-9a-f]{64} does not match metrics.fvd_i3d.sha256 0+"):
        run(compose_eval(*score_overrides(out, f"benchmark.data_root={data_root}",
                                          f"metrics.fvd_i3d.weights={i3d_path}", f"metrics.fvd_i3d.sha256={'0' * 64}")))  # fmt: skip
    with pytest.raises(
        FileNotFoundError, match=r"reference video .*vids/.*\.mp4 \(data_file of prompt 0\) does not exist"
    ):
        run(compose_eval(*score_overrides(out, f"benchmark.data_root={tmp_path}")))
    with pytest.raises(
        RuntimeError, match=r"1 of 6 videos in .* are missing or incomplete \(first: video_00005_seed0.mp4\)"
    ):
        run(compose_eval(*score_overrides(out, "benchmark.limit=6")))
    partial = run(compose_eval(*score_overrides(out, "benchmark.limit=6", "score.require_complete=false")))
    assert partial["videos"] == {"expected": 6, "complete": 5, "missing": ["video_00005_seed0.mp4"]}


def test_tiles_are_deterministic_and_inside_the_frame():
    frames = np.random.default_rng(0).integers(0, 256, (16, 240, 300, 3), dtype=np.uint8)
    first = random_tiles(frames, 3, [0, 4, 0, 0])
    assert first.shape == (3, 3, 16, 224, 224) and first.min() >= -1 and first.max() <= 1
    assert torch.equal(first, random_tiles(frames, 3, [0, 4, 0, 0]))
    assert tile_positions(240, 300, 3, [0, 4, 0, 0]) != tile_positions(240, 300, 3, [0, 5, 0, 0])
    assert all(0 <= y <= 16 and 0 <= x <= 76 for y, x in tile_positions(240, 300, 50, [1]))
    with pytest.raises(ValueError, match=r"frames of 100x300 are smaller than the 224x224 tiles"):
        tile_positions(100, 300, 1, [0])


# --- one effective frame rate -----------------------------------------------------------------------------


def test_clip_indices_sample_every_video_at_the_effective_rate():
    assert clip_indices(81, 16, source_fps=16, fps=16) == list(range(16))
    assert clip_indices(81, 4, source_fps=32, fps=16) == [0, 2, 4, 6]
    assert clip_indices(81, 4, source_fps=30, fps=16) == [0, 2, 4, 6]  # 1.875 k, halves up: 0, 1.9, 3.8, 5.6
    assert clip_indices(81, 5, source_fps=24, fps=16, start=2) == [3, 5, 6, 8, 9]
    assert clip_indices(81, 4, source_fps=8, fps=16) == [0, 1, 1, 2]  # below the rate: frames repeat
    assert clip_indices(30000, 3, source_fps=30000 / 1001, fps=16) == [0, 2, 4]
    assert clip_indices(30, 16, source_fps=32, fps=16) is None  # needs frame 30
    with pytest.raises(ValueError, match="frame rates must be > 0"):
        clip_indices(81, 16, source_fps=0.0, fps=16)


def _ramp_video(path: Path, fps: int, seconds: float, variant: int) -> None:
    """Flat frames whose colour is a function of time only: the same motion at any frame rate."""
    t = np.arange(round(fps * seconds) + 1) / fps
    colour = np.stack(
        [40 + 100 * t + 30 * variant, 200 - 80 * t - 20 * variant, 60 + 40 * variant + 0 * t], -1
    )
    frames = np.broadcast_to(colour[:, None, None, :], (len(t), 64, 64, 3)).round().astype(np.uint8)
    write_video(path, frames, fps=fps)


def test_fvd_compares_videos_at_two_frame_rates_at_the_same_times(i3d_path, tmp_path):
    """Generated videos at 16 fps (mp4s labelled 30) against references of the same motion at 32 fps: with
    both sampled at 16 fps the clips show the same instants and FVD is ~0; taken as consecutive frames of
    each file they would not (the reference clip would span half the time)."""
    out, data_root = tmp_path / "run", tmp_path / "data"
    out.mkdir()
    entries = load_prompts(PROMPT_LISTS / "4k_vbench.json", limit=3)
    for entry in entries:
        (data_root / entry.data_file).parent.mkdir(parents=True, exist_ok=True)
        _ramp_video(data_root / entry.data_file, fps=32, seconds=2, variant=entry.index)
        generated = out / f"video_{entry.index:05d}_seed0.mp4"
        _ramp_video(generated, fps=16, seconds=2, variant=entry.index)
        write_video(generated, read_frames(generated, range(33)), fps=30)  # the 30 fps label, same frames
        record = {"frames": 33, "prompt": entry.prompt, "fps": 30, "content_fps": 16}
        generated.with_suffix(".json").write_text(json.dumps(record))

    def fvd(*extra: str) -> dict:
        return run(compose_eval(*score_overrides(
            out, "benchmark.limit=3", f"benchmark.data_root={data_root}", f"metrics.fvd_i3d.weights={i3d_path}",
            "metrics.fvd_i3d_crop224.enabled=false", *extra,
        )))["metrics"]["fvd_i3d"]  # fmt: skip

    aligned = fvd()
    assert aligned["protocol"]["fps"] == 16
    assert aligned["protocol"]["source_fps"] == {"generated": {"16": 3}, "reference": {"32": 3}}

    # The same references read as consecutive frames (as if they were at the generated videos' rate).
    detector = torch.jit.load(str(i3d_path))

    def features(paths: list[Path], indices: list[int]) -> np.ndarray:
        clips = torch.stack([resized_clip(read_frames(p, indices)) for p in paths])
        with torch.no_grad():
            return detector(clips, **DETECTOR_KWARGS).double().numpy()

    gen = features([out / f"video_{e.index:05d}_seed0.mp4" for e in entries], list(range(16)))
    refs = [data_root / e.data_file for e in entries]
    consecutive = frechet_eigh(features(refs, list(range(16))), gen)
    assert aligned["value"] == pytest.approx(
        frechet_eigh(features(refs, list(range(0, 32, 2))), gen), abs=1e-6
    )
    assert aligned["value"] < 0.05 * consecutive, (aligned["value"], consecutive)  # codec noise only


def test_metrics_node_is_read_through_its_typed_schema():
    from t3.config import ConfigError
    from t3.eval.settings import MetricsConfig, ScoreSettings, from_node

    node = {"fvd_i3d": {"num_frames": 8, "fps": 24}, "fvd_i3d_crop224": {"seed": 3}, "vqa_dover": {"seed": 1}}
    settings = ScoreSettings.from_metrics(from_node(MetricsConfig, node, "metrics"))
    assert (settings.fvd.num_frames, settings.fvd.fps, settings.fvd.tile_seed) == (8, 24, 3)
    assert settings.dover.seed == 1 and settings.clip_num_frames == 8
    with pytest.raises(ValueError, match=r"^metrics.fvd_i3d.frames: unknown key; accepted: \["):
        from_node(MetricsConfig, {"fvd_i3d": {"frames": 8}}, "metrics")
    with pytest.raises(ConfigError, match="metrics.vtc_clip.num_frames"):
        from_node(MetricsConfig, {"vtc_clip": {"num_frames": "eight"}}, "metrics")

"""``vqa_dover*`` and ``vtc_viclip`` run the authors' code from a local checkout: the adapters, against stand-ins.

DOVER and VBench cannot be installed here (and DOVER's code may not be copied), so each test writes a
STAND-IN checkout: a git repository with the module paths, class and function names of the real one
(VQAssessment/DOVER at f1ddc96, Vchitect/VBench at 45e79ec) and trivial bodies that record how they are
called. The stand-ins check the plumbing: that the adapters call the upstream entry points with the upstream
protocol's inputs and report what those return. They compute nothing like the real models.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from t3.eval import run
from t3.eval.metrics.upstream import checkout_commit, import_from_checkout
from t3.eval.metrics.vqa import DOVER_WRITTEN_AGAINST
from t3.eval.metrics.vtc import VICLIP_WRITTEN_AGAINST

from .test_eval_generate import compose_eval
from .test_eval_score import score_overrides, write_scored_run

STANDIN_NOTE = "STAND-IN written by t3's tests; not the upstream code.\n"

DOVER_FILES = {
    "dover/__init__.py": "",
    "dover/models/__init__.py": """
        import torch
        from torch import nn

        CALLS = []

        class DOVER(nn.Module):
            def __init__(self, **args):
                super().__init__()
                CALLS.append(("DOVER", args))
                self.scale = nn.Parameter(torch.ones(1))

            def forward(self, vclips, inference=True, reduce_scores=False, **kwargs):
                CALLS.append(("forward", [(k, tuple(v.shape)) for k, v in vclips.items()], reduce_scores))
                # One score map per view, in the order of the views (DOVER's own contract).
                return [self.scale * v.mean() * torch.ones(v.shape[0], 1, 2, 2, 2) for v in vclips.values()]
        """,
    "dover/datasets/__init__.py": """
        import numpy as np
        import torch

        CALLS = []

        class ViewDecompositionDataset(torch.utils.data.Dataset):
            def __init__(self, opt):
                CALLS.append(("dataset", opt))
                self.video_infos = opt["anno_file"]

            def __len__(self):
                return len(self.video_infos)

            def __getitem__(self, index):
                name = self.video_infos[index]["filename"]
                if "broken" in name:
                    return {"name": name}
                # Random, like DOVER's fragment and frame offsets: the adapter must seed it.
                offset = float(np.random.rand()) + float(torch.rand(1))
                return {
                    "technical": torch.full((3, 96, 4, 4), offset),
                    "aesthetic": torch.full((3, 32, 4, 4), 2 * offset),
                    "num_clips": {"technical": 3, "aesthetic": 1},
                    "name": name,
                }
        """,
    "evaluate_a_set_of_videos.py": """
        import math

        from dover.models import CALLS  # the real script imports dover.models too

        def fuse_results(results):
            CALLS.append(("fuse_results", list(results)))
            a, t = results[0], results[1]
            sig = lambda x: 1 / (1 + math.exp(-x))
            return {"aesthetic": sig(a), "technical": sig(t), "overall": sig(a - t)}

        if __name__ == "__main__":
            raise SystemExit("the adapter must not run the script")
        """,
    "dover.yml": """
        model:
            type: DOVER
            args:
                backbone_size: divided
                backbone_preserve_keys: technical,aesthetic
                divide_head: true
        data:
            val-l1080p:
                type: ViewDecompositionDataset
                args:
                    phase: test
                    anno_file: ./examplar_data_labels/LSVQ/labels_1080p.txt
                    data_prefix: ../datasets/LSVQ/
                    sample_types:
                        technical: {fragments_h: 7, fragments_w: 7, clip_len: 32, frame_interval: 2, num_clips: 3}
                        aesthetic: {size_h: 224, size_w: 224, clip_len: 32, frame_interval: 2, t_frag: 32, num_clips: 1}
        """,
}

VBENCH_FILES = {
    "vbench/__init__.py": "",
    "vbench/third_party/__init__.py": "",
    "vbench/third_party/ViCLIP/__init__.py": "",
    "vbench/third_party/ViCLIP/simple_tokenizer.py": """
        import os

        CALLS = []

        class SimpleTokenizer:
            def __init__(self, bpe_path):
                assert os.path.isfile(bpe_path), bpe_path
                CALLS.append(("SimpleTokenizer", bpe_path))
        """,
    "vbench/third_party/ViCLIP/viclip.py": """
        import torch
        from torch import nn

        CALLS = []

        class ViCLIP(nn.Module):
            def __init__(self, tokenizer=None, pretrain=None, freeze_text=True):
                super().__init__()
                CALLS.append(("ViCLIP", tokenizer, pretrain))
                self.bias = nn.Parameter(torch.zeros(1))
                self.load_state_dict(torch.load(pretrain, map_location="cpu")["model"])
        """,
    "vbench/overall_consistency.py": """
        import os

        CALLS = []

        def overall_consistency(clip_model, video_dict, tokenizer, device, sample="middle"):
            CALLS.append((clip_model, video_dict, tokenizer, device, sample))
            results = []
            for info in video_dict:
                for path in info["video_list"]:
                    score = float(clip_model.bias.detach()) + len(info["prompt"]) / 1000 + os.path.getsize(path) % 7 / 100
                    results.append({"video_path": path, "video_results": score})
            return sum(r["video_results"] for r in results) / len(results), results
        """,
}


def write_standin(root: Path, files: dict[str, str]) -> str:
    """A stand-in checkout at ``root``, committed to a git repository; returns its commit."""
    for relative, body in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        comment = "" if relative.endswith(".yml") or not body else "# " + STANDIN_NOTE
        path.write_text(comment + textwrap.dedent(body).lstrip("\n"))
    (root / "STANDIN.txt").write_text(STANDIN_NOTE)
    git = ["git", "-C", str(root), "-c", "user.name=t3 tests", "-c", "user.email=tests@t3.invalid"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "stand-in"], check=True)
    return subprocess.run(
        [*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory) -> tuple[Path, Path]:
    return write_scored_run(tmp_path_factory.mktemp("score"))


@pytest.fixture(scope="module")
def dover_standin(tmp_path_factory):
    root = tmp_path_factory.mktemp("dover_standin")
    commit = write_standin(root, DOVER_FILES)
    weights = root / "DOVER.pth"
    torch.save({"scale": torch.tensor([2.0])}, weights)
    yield root, weights, commit
    for name in [m for m in sys.modules if m == "dover" or m.startswith("dover.")]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def vbench_standin(tmp_path_factory):
    root = tmp_path_factory.mktemp("vbench_standin")
    commit = write_standin(root, VBENCH_FILES)
    cache = root / "cache" / "ViCLIP"  # VBench's cache layout: weights and vocabulary side by side
    cache.mkdir(parents=True)
    torch.save({"model": {"bias": torch.tensor([0.25])}}, cache / "ViClip-InternVid-10M-FLT.pth")
    (cache / "bpe_simple_vocab_16e6.txt.gz").write_bytes(b"stand-in vocabulary")
    yield root, cache / "ViClip-InternVid-10M-FLT.pth", commit
    for name in [m for m in sys.modules if m == "vbench" or m.startswith("vbench.")]:
        del sys.modules[name]


def _calls(module: str) -> list:
    return sys.modules[module].CALLS


def test_dover_adapter_calls_the_upstream_entry_points_with_the_upstream_protocol(scored_run, dover_standin):
    out, _ = scored_run
    root, weights, commit = dover_standin
    overrides = score_overrides(out, f"metrics.vqa_dover.repo={root}", f"metrics.vqa_dover.weights={weights}")
    report = run(compose_eval(*overrides))
    m = report["metrics"]
    names = [f"video_{i:05d}_seed0.mp4" for i in range(5)]

    # The model: DOVER(**dover.yml model.args), then DOVER.pth.
    (model_call,) = [c for c in _calls("dover.models") if c[0] == "DOVER"]
    assert model_call[1] == {"backbone_size": "divided", "backbone_preserve_keys": "technical,aesthetic",
                             "divide_head": True}  # fmt: skip
    # The views: the script's val-l1080p options, our videos as the annotation list, one item per video.
    (dataset_call,) = _calls("dover.datasets")
    options = dataset_call[1]
    assert options["sample_types"]["technical"]["num_clips"] == 3 and options["phase"] == "test"
    assert options["anno_file"] == [{"filename": str(out / n), "label": -1} for n in names]
    # DOVER's forward: aesthetic then technical, each split into its clips along time, unreduced.
    forwards = [c for c in _calls("dover.models") if c[0] == "forward"]
    assert len(forwards) == 5
    assert all(c[1] == [("aesthetic", (1, 3, 32, 4, 4)), ("technical", (3, 3, 32, 4, 4))] for c in forwards)
    assert all(c[2] is False for c in forwards)
    # The script's fusion, fed [aesthetic, technical] branch means (scale 2 from DOVER.pth), x 100.
    fused_inputs = [c[1] for c in _calls("dover.models") if c[0] == "fuse_results"]
    assert len(fused_inputs) == 5 and all(a == pytest.approx(2 * t) for a, t in fused_inputs)

    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731 - the stand-in's fusion
    expected = {
        "vqa_dover": [100 * sig(a - t) for a, t in fused_inputs],
        "vqa_dover_technical": [100 * sig(t) for _, t in fused_inputs],
        "vqa_dover_aesthetic": [100 * sig(a) for a, _ in fused_inputs],
    }
    for name, values in expected.items():
        assert m[name]["status"] == "ok" and m[name]["num_generated"] == 5
        assert list(m[name]["per_video"]) == names
        assert list(m[name]["per_video"].values()) == pytest.approx(values)
        assert m[name]["value"] == pytest.approx(sum(values) / 5)
        assert m[name]["protocol"]["upstream_commit"] == commit
        assert m[name]["protocol"]["written_against"] == DOVER_WRITTEN_AGAINST
    assert list(m) == ["fvd_i3d", "fvd_i3d_crop224", "vtc_clip", "vtc_viclip", *expected]
    assert json.loads((out / "results.json").read_text())["metrics"]["vqa_dover"] == m["vqa_dover"]

    # Seeded per video: the same scores again, and different videos drew different offsets.
    again = run(compose_eval(*overrides))["metrics"]["vqa_dover"]["per_video"]
    assert again == m["vqa_dover"]["per_video"] and len(set(again.values())) == 5


def test_viclip_adapter_calls_vbench_overall_consistency_as_vbench_does(scored_run, vbench_standin):
    out, _ = scored_run
    root, weights, commit = vbench_standin
    report = run(compose_eval(*score_overrides(
        out, f"metrics.vtc_viclip.repo={root}", f"metrics.vtc_viclip.weights={weights}",
    )))  # fmt: skip
    m = report["metrics"]["vtc_viclip"]

    (tokenizer_call,) = _calls("vbench.third_party.ViCLIP.simple_tokenizer")
    assert tokenizer_call[1] == str(weights.parent / "bpe_simple_vocab_16e6.txt.gz")  # beside the weights
    (model_call,) = _calls("vbench.third_party.ViCLIP.viclip")
    (call,) = _calls("vbench.overall_consistency")
    model, video_dict, tokenizer, device, sample = call
    assert model_call[1] is tokenizer and model_call[2] == str(weights)
    assert sample == "middle" and str(device) == "cpu"  # VBench's default frame sampling
    prompts = json.loads(Path(out / "video_00000_seed0.json").read_text())["prompt"]
    assert video_dict[0] == {"prompt": prompts, "video_list": [str(out / "video_00000_seed0.mp4")]}
    assert len(video_dict) == 5

    assert m["status"] == "ok" and m["num_generated"] == 5
    assert m["value"] == pytest.approx(sum(m["per_video"].values()) / 5)
    assert min(m["per_video"].values()) >= 0.25  # the bias loaded from the weights
    assert m["protocol"]["upstream_commit"] == commit
    assert m["protocol"]["written_against"] == VICLIP_WRITTEN_AGAINST


def test_without_paths_the_upstream_metrics_are_skipped_and_a_wrong_checkout_fails_early(
    scored_run, tmp_path
):
    out, _ = scored_run
    m = run(compose_eval(*score_overrides(out)))["metrics"]
    assert (
        m["vtc_viclip"]["message"]
        == "vtc_viclip: skipped: no upstream checkout (metrics.vtc_viclip.repo is null)"
    )
    for name in ("vqa_dover", "vqa_dover_technical", "vqa_dover_aesthetic"):
        assert m[name]["message"] == f"{name}: skipped: no upstream checkout (metrics.vqa_dover.repo is null)"
    missing = run(compose_eval(*score_overrides(out, f"metrics.vqa_dover.repo={tmp_path}")))["metrics"]
    assert (
        missing["vqa_dover"]["message"]
        == "vqa_dover: skipped: no weights (metrics.vqa_dover.weights is null)"
    )

    weights = tmp_path / "DOVER.pth"
    weights.write_bytes(b"")
    with pytest.raises(
        FileNotFoundError, match=r"^metrics.vqa_dover.repo='.*' has no dover/__init__.py; is it the"
    ):
        run(compose_eval(*score_overrides(
            out, f"metrics.vqa_dover.repo={tmp_path}", f"metrics.vqa_dover.weights={weights}",
        )))  # fmt: skip


def test_checkout_helpers_refuse_shadowed_packages_and_other_repositories(dover_standin, tmp_path):
    root, _, commit = dover_standin
    assert checkout_commit(root) == commit
    nested = root / "dover" / "models"
    assert checkout_commit(nested) is None  # inside the checkout, not a checkout of its own
    assert checkout_commit(tmp_path) is None
    import_from_checkout(root, ["dover.models"])  # already imported from this checkout: fine
    other = tmp_path / "other"
    (other / "dover").mkdir(parents=True)
    (other / "dover" / "__init__.py").write_text("")
    with pytest.raises(ImportError, match=r"module 'dover' is already imported from .*dover_standin"):
        import_from_checkout(other, ["dover"])

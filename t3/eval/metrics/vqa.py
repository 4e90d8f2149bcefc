"""No-reference video quality through DOVER's own code: ``vqa_dover``, ``vqa_dover_technical``, ``vqa_dover_aesthetic``.

The T3 paper reports a "VQA" score (0-100) without naming the model; its values fit DOVER's fused score
x 100 (DOVER: Wu et al., ICCV 2023). DOVER is not on PyPI and its licence forbids redistributing its code,
so t3 holds none of it: ``metrics.vqa_dover.repo`` names a local checkout of VQAssessment/DOVER and
``metrics.vqa_dover.weights`` its ``DOVER.pth``, and `DoverQuality` imports the upstream model, view
sampling and score fusion from there (`t3.eval.metrics.upstream`). Without both paths the three metrics
are reported as skipped.

Protocol: DOVER's ``evaluate_a_set_of_videos.py``, the authors' script for scoring a folder of videos, as
of commit ``DOVER_WRITTEN_AGAINST`` (2024-08-12); the commit of the checkout actually used is recorded with
every score, and a different one is logged as a warning.

* model: ``dover.models.DOVER(**opt["model"]["args"])`` with ``opt`` the checkout's ``dover.yml``, weights
  from ``DOVER.pth`` (``load_state_dict``). DOVER's constructor fetches ImageNet ConvNeXt weights through
  ``torch.hub`` for its aesthetic branch (then replaced by ``DOVER.pth``): on an offline machine put that
  file in ``torch.hub.get_dir()/checkpoints`` first;
* views: ``dover.datasets.ViewDecompositionDataset`` with the options of ``opt["data"]["val-l1080p"]`` (the
  script's choice), which read the mp4 itself (decord), cut the technical view (fragments) and the
  aesthetic view (a resized clip) and normalise them; each view is then split into its ``num_clips`` clips
  along time, as the script does;
* scores: ``evaluator(views, reduce_scores=False)`` with the views in the script's order (aesthetic,
  technical), the mean of each branch, then the script's own ``fuse_results``: it normalises each branch
  with fixed constants and returns the sigmoid of each and of their weighted sum (``overall``). As the
  script writes them, the scores are multiplied by 100: ``vqa_dover`` is the fused overall score (the
  paper's 0-100 scale), the other two the per-branch scores;
* randomness: DOVER draws fragment offsets (torch) and, for videos longer than its clips, frame offsets
  (numpy) from the global random generators, unseeded. t3 seeds both per video from ``(seed, prompt index,
  video seed)`` and restores them afterwards, so a score is reproducible; videos are read one at a time in
  this process (the script uses a DataLoader with workers).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from t3.eval.metrics.upstream import checkout_paths, import_from_checkout, load_script, upstream_commit
from t3.io import sha256_file

__all__ = [
    "DOVER_WRITTEN_AGAINST",
    "VQA_DOVER_AESTHETIC_NAME",
    "VQA_DOVER_NAME",
    "VQA_DOVER_TECHNICAL_NAME",
    "DoverQuality",
    "DoverSettings",
]

logger = logging.getLogger(__name__)

VQA_DOVER_NAME = "vqa_dover"
VQA_DOVER_TECHNICAL_NAME = "vqa_dover_technical"
VQA_DOVER_AESTHETIC_NAME = "vqa_dover_aesthetic"

#: The VQAssessment/DOVER commit the adapter was written against (its entry points and dover.yml keys).
DOVER_WRITTEN_AGAINST = "f1ddc96215bc7fbcf8f315c65d47905f339c3419"

#: Files of the checkout the adapter calls into.
_REQUIRED = (
    "dover/__init__.py",
    "dover/models/__init__.py",
    "dover/datasets/__init__.py",
    "evaluate_a_set_of_videos.py",
)
#: The script's options and view order.
_DATA_OPTIONS = "val-l1080p"
_VIEW_ORDER = ("aesthetic", "technical")


@dataclass(frozen=True)
class DoverSettings:
    """``metrics.vqa_dover``.

    Attributes:
        enabled: Compute the three DOVER scores.
        repo: Local checkout of VQAssessment/DOVER (None: skipped).
        weights: ``DOVER.pth`` (None: skipped).
        config: The checkout's option file, relative to ``repo`` (``dover.yml``).
        seed: Seed of DOVER's random view sampling (per video, see the module docstring).
    """

    enabled: bool = True
    repo: str | None = None
    weights: str | None = None
    config: str = "dover.yml"
    seed: int = 0

    def resolve(self) -> tuple[Path, Path] | str:
        """``(checkout, weights)`` if both are given and exist, else the reason to skip; a checkout without
        DOVER's files is refused (one line naming the key)."""
        if not self.enabled:
            return f"disabled (metrics.{VQA_DOVER_NAME}.enabled=false)"
        found = checkout_paths(
            f"metrics.{VQA_DOVER_NAME}", self.repo, (*_REQUIRED, self.config), {"weights": self.weights}
        )
        if isinstance(found, str):
            return found
        root, files = found
        return root, files["weights"]


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """torch, numpy and ``random`` global generators seeded inside, restored after."""
    numpy_state, python_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(numpy_state)
            random.setstate(python_state)


def _video_seed(seed: int, key: Sequence[int]) -> int:
    digest = hashlib.sha256(":".join(str(int(k)) for k in (seed, *key)).encode()).digest()
    return int.from_bytes(digest[:4], "little")


class DoverQuality:
    """DOVER scores of videos, computed by the upstream code of a local checkout.

    Args:
        repo: The DOVER checkout.
        weights: ``DOVER.pth``.
        config: Option file inside the checkout.
        seed: Seed of the per-video view sampling.
        device: Where DOVER runs.
    """

    def __init__(
        self,
        repo: Path,
        weights: Path,
        *,
        config: str = "dover.yml",
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        import yaml

        self.repo, self.weights, self.seed = Path(repo), Path(weights), int(seed)
        self.device = torch.device(device)
        self.commit = upstream_commit(VQA_DOVER_NAME, self.repo, DOVER_WRITTEN_AGAINST)
        self.opt = yaml.safe_load((self.repo / config).read_text(encoding="utf-8"))
        modules = import_from_checkout(self.repo, ["dover.models", "dover.datasets"])
        self._dataset_cls = modules["dover.datasets"].ViewDecompositionDataset
        self._fuse = load_script(self.repo, "evaluate_a_set_of_videos.py").fuse_results
        try:
            self.model = modules["dover.models"].DOVER(**self.opt["model"]["args"]).to(self.device)
        except Exception as err:  # upstream code: any error type
            raise RuntimeError(
                f"vqa_dover: DOVER(**{config} model.args) failed ({type(err).__name__}: {err}); DOVER's "
                f"aesthetic branch fetches ImageNet ConvNeXt weights through torch.hub: offline, put them in "
                f"{torch.hub.get_dir()}/checkpoints"
            ) from err
        self.model.load_state_dict(torch.load(self.weights, map_location=self.device))
        self.weights_sha256 = sha256_file(self.weights)

    def _views(self, data: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The dataset's views ``[C, T, H, W]`` as the script feeds them: ``[clips, C, T / clips, H, W]``."""
        views = {}
        for key in _VIEW_ORDER:
            if key not in data:
                continue
            clips = int(data["num_clips"][key])
            c, t, h, w = data[key].shape
            views[key] = (
                data[key]
                .reshape(c, clips, t // clips, h, w)
                .permute(1, 0, 2, 3, 4)
                .contiguous()
                .to(self.device)
            )
        return views

    @torch.no_grad()
    def score(
        self, videos: Sequence[tuple[str, Path, Sequence[int]]]
    ) -> tuple[dict[str, dict[str, float]], list[str]]:
        """DOVER's 0-100 scores of each video.

        Args:
            videos: ``(name, mp4 path, seed key)`` per video; the key seeds its view sampling.

        Returns:
            ``({name: {"overall", "technical", "aesthetic"}}, names of the videos DOVER could not read)``.
        """
        options = copy.deepcopy(self.opt["data"][_DATA_OPTIONS]["args"])
        options["anno_file"] = [{"filename": str(path), "label": -1} for _, path, _ in videos]
        options["data_prefix"] = ""
        dataset = self._dataset_cls(options)
        scores, failed = {}, []
        for index, (name, _, key) in enumerate(videos):
            with _seeded(_video_seed(self.seed, key)):
                data = dataset[index]
                if len(data) == 1:  # only its "name": the dataset's way of saying the video could not be read
                    failed.append(name)
                    logger.warning("vqa_dover: DOVER could not read %s; left out", name)
                    continue
                results = self.model(self._views(data), reduce_scores=False)
            raw = [float(np.mean(r.cpu().numpy())) for r in results]
            fused = self._fuse(raw)
            scores[name] = {k: 100 * float(fused[k]) for k in ("overall", "technical", "aesthetic")}
        return scores, failed

    def protocol(self) -> dict[str, Any]:
        return {
            "implementation": f"DOVER's own code from {self.repo} (evaluate_a_set_of_videos.py protocol)",
            "upstream_commit": self.commit,
            "written_against": DOVER_WRITTEN_AGAINST,
            "weights": str(self.weights),
            "weights_sha256": self.weights_sha256,
            "views": f"dover.yml data.{_DATA_OPTIONS}.args.sample_types",
            "fusion": "evaluate_a_set_of_videos.fuse_results([aesthetic, technical]), x 100",
            "seed": self.seed,
        }

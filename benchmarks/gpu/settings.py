"""The settings the kit measures, taken from the training experiments that own them.

Model, video size, T3 schedule, checkpointing and activation offload come from composing
``conf/train.yaml`` with ``experiment=<name>`` (``t3_720p``, ``t3_4k``, ``t3_4k_wan22``) and
validating it, exactly as ``python train.py experiment=<name> dry_run=true`` does; the token grid
is `t3.config.RunFacts.grid`. With ``--tiny`` the same experiments run on the tiny model at
test-sized videos (`TINY_OVERRIDES`), with the authors' windows in place of their 4K piece counts
(which do not fit small grids).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from t3.config import RunFacts

__all__ = ["REPO_ROOT", "TINY_OVERRIDES", "Setting", "setting"]

REPO_ROOT = Path(__file__).resolve().parents[2]

# Tiny model, 21 frames -> 6 latent frames: "720p" is grid 6x4x6 (144 tokens), "4K" 6x8x12 (576
# tokens), where every plan of both schedules divides the grid and some plans gather (two branches).
_TINY_720P = ["data.height=64", "data.width=96", "data.num_frames=21"]
_TINY_4K = ["data.height=128", "data.width=192", "data.num_frames=21"]
TINY_OVERRIDES: dict[str, list[str]] = {
    "t3_720p": ["model=tiny", "t3=wan21_windows", *_TINY_720P],
    "t3_4k": ["model=tiny", "t3=wan21_windows", *_TINY_4K],
    # wan22_windows is made for Wan2.2's 4x32x32-pixel tokens (made_for); the stand-in runs its plans on tiny's.
    "t3_4k_wan22": ["model=tiny", "t3=wan22_windows", "t3.made_for=null", *_TINY_4K],
}


@dataclass(frozen=True)
class Setting:
    """A validated training config and what follows from it."""

    experiment: str
    cfg: DictConfig
    facts: RunFacts

    @property
    def size(self) -> str:
        d = self.cfg.data
        return f"{d.width}x{d.height}x{d.num_frames}"


def setting(experiment: str, tiny: bool, overrides: Sequence[str] = ()) -> Setting:
    """Compose and validate ``experiment=<experiment>`` (test-sized with ``tiny``) plus ``overrides``."""
    from hydra import compose, initialize_config_dir

    from t3.config import register_configs, validate

    register_configs()
    extra = [*(TINY_OVERRIDES[experiment] if tiny else []), *overrides]
    # dry_run: weight and data paths may stay unset; nothing here reads them.
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"experiment={experiment}", "dry_run=true", *extra])
    return Setting(experiment, cfg, validate(cfg))

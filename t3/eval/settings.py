"""The eval settings: one typed dataclass per config node of ``conf/eval.yaml``, read and checked in one place.

Each stage (`t3.eval.generate_stage`, `t3.eval.score_stage`, `t3.eval.speed_stage`) takes its settings from
here and never from a sibling stage. A config node becomes its dataclass through `from_node`, which names an
unknown key; each dataclass checks its values (types through `t3.config.check_field_types`, ranges in
``__post_init__``), so bad input fails in one line naming the key, before any model is loaded.

* ``generation`` (+ ``model.attention_backend``, ``model.attention_tokens_per_call``): `GenerationSettings`;
* ``model`` and ``ckpt``: `ModelPaths`;
* ``parallel``: the training config's `t3.config.ParallelConfig` (one video across the ranks of an SP
  group under ``torchrun``), checked against the world size and the token grid by `check_parallel`;
* ``metrics`` (``conf/metrics/*.yaml``) and ``score``: `MetricsConfig`, then `ScoreSettings` for the stage;
* ``speed``: `SpeedSettings`.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from t3.attention import Schedule
from t3.config import ParallelConfig, check_field_types
from t3.config.checks import fail
from t3.diffusion import SCHEDULER_NAMES
from t3.eval.metrics import DoverSettings, ViClipSettings
from t3.eval.metrics.fvd import DETECTOR_KWARGS, I3D_NUM_FEATURES
from t3.generate import WAN_NEGATIVE_PROMPT
from t3.models import get_spec, load_dit, load_text_encoder, load_vae
from t3.models.build import DTYPES

__all__ = [
    "FVDSettings",
    "GenerationSettings",
    "MetricsConfig",
    "ModelPaths",
    "ScoreSettings",
    "SpeedSettings",
    "check_parallel",
    "check_settings",
    "from_node",
    "generation_settings",
    "model_paths",
    "parallel_settings",
    "resolve_device",
    "resolve_dtype",
    "score_settings",
    "speed_settings",
]


# --- reading a config node into its dataclass -------------------------------------------------------------


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def from_node(cls: type, node: Any, key: str) -> Any:
    """The settings dataclass ``cls`` from config node ``key``, naming unknown keys; a field whose type is
    itself a dataclass is read from the sub-node of its name."""
    values = dict(_plain(node) or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{key}.{unknown[0]}: unknown key; accepted: {sorted(names)}")
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        if dataclasses.is_dataclass(hints[name]) and not dataclasses.is_dataclass(value):
            values[name] = from_node(hints[name], value, f"{key}.{name}")
    return cls(**values)


# --- generation and the model ------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationSettings:
    """How every video of a run is generated (the ``generation`` config node).

    Attributes:
        height: Frame height in pixels (the authors' 4K: 2176).
        width: Frame width in pixels (3840).
        frames: Frames per video, ``4k + 1`` (81).
        steps: Sampler steps (50).
        guidance_scale: Classifier-free guidance scale (5.0).
        flow_shift: Timestep shift of the sampler (5.0).
        seeds: One video per prompt and seed; each video's noise comes from its seed alone.
        negative_prompt: Negative prompt; None = Wan's standard one (`t3.generate.WAN_NEGATIVE_PROMPT`).
        fps: Frame rate written into the mp4s (the authors saved at 30).
        sampler: ``diffsynth_euler`` (the T3 authors' sampler), ``unipc`` (the official Wan sampler) or
            ``euler`` (diffusers' flow-matching Euler); see `t3.diffusion.build_scheduler`.
        dtype: DiT compute dtype: ``auto`` (bfloat16 on CUDA, float32 on CPU), ``bfloat16``, ``float32``...
        device: ``auto`` (CUDA if available), ``cuda``, ``cpu``...
        backend: T3 attention backend (``auto``, ``sdpa``, ``flash``).
        tokens_per_call: bound on the gathered slots per T3 attention call (from
            ``model.attention_tokens_per_call``); None: automatic.
        vae_tiling: Decode in spatial tiles (needed at 4K).
    """

    height: int = 2176
    width: int = 3840
    frames: int = 81
    steps: int = 50
    guidance_scale: float = 5.0
    flow_shift: float = 5.0
    seeds: tuple[int, ...] = (0,)
    negative_prompt: str | None = None
    fps: float = 30.0
    sampler: str = "diffsynth_euler"
    dtype: str = "auto"
    device: str = "auto"
    backend: str = "auto"
    tokens_per_call: int | None = None
    vae_tiling: bool = True

    def __post_init__(self) -> None:
        # Types first (a value of the wrong type would otherwise fail inside a model, naming no key).
        check_field_types(
            self,
            "generation",
            {"backend": "model.attention_backend", "tokens_per_call": "model.attention_tokens_per_call"},
        )
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        if self.tokens_per_call is not None and (
            isinstance(self.tokens_per_call, bool)
            or not isinstance(self.tokens_per_call, int)
            or self.tokens_per_call < 1
        ):
            raise ValueError(
                f"model.attention_tokens_per_call must be a positive integer or null, got {self.tokens_per_call!r}"
            )
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(
                f"generation.seeds must be a non-empty list of distinct ints, got {list(self.seeds)}"
            )
        if self.steps < 1:
            raise ValueError(f"generation.steps must be >= 1, got {self.steps}")
        if not self.fps > 0:
            raise ValueError(f"generation.fps must be > 0, got {self.fps}")
        if self.sampler not in SCHEDULER_NAMES:
            raise ValueError(
                f"generation.sampler must be one of {list(SCHEDULER_NAMES)}, got {self.sampler!r}"
            )
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(
                f"generation.dtype must be 'auto' or one of {sorted(DTYPES)}, got {self.dtype!r}"
            )

    @property
    def negative(self) -> str:
        return WAN_NEGATIVE_PROMPT if self.negative_prompt is None else self.negative_prompt


@dataclass(frozen=True)
class ModelPaths:
    """Where the parts of the model are (the ``model`` config node plus ``ckpt``).

    For the ``tiny`` preset a null path means the tiny random part (`t3.models.tiny`), built in memory
    from ``seed``: a CPU end-to-end run with nothing on disk. Every other preset needs all three paths.

    Attributes:
        preset: Model preset (`t3.models.preset_names`).
        dit_path: DiT checkpoint in any format `t3.models.load_dit` reads (``ckpt`` overrides the model's).
        vae_path: Wan VAE folder.
        text_encoder_path: umT5 folder.
        seed: Seed of the tiny random parts (``model.seed``).
    """

    preset: str
    dit_path: str | None
    vae_path: str | None
    text_encoder_path: str | None
    seed: int = 0

    @property
    def random_parts(self) -> bool:
        """Whether null paths stand for the tiny random parts."""
        return self.preset == "tiny"

    def check(self) -> None:
        """One-line error naming the key of the first missing path."""
        for key, value in (
            ("ckpt / model.dit_path", self.dit_path),
            ("model.vae_path", self.vae_path),
            ("model.text_encoder_path", self.text_encoder_path),
        ):
            if value is None:
                if self.random_parts:
                    continue
                raise ValueError(
                    f"{key} is required for generation (a local path), got null; only model=tiny builds "
                    "random parts in memory"
                )
            if not Path(value).exists():
                raise FileNotFoundError(f"{key}={value!r}: no such file or folder")

    @property
    def dit_source(self) -> str:
        """The DiT's path, or what stands in for it."""
        return str(self.dit_path) if self.dit_path is not None else f"tiny random DiT (seed {self.seed})"

    def load_dit(self, dtype: torch.dtype) -> torch.nn.Module:
        """The DiT in ``dtype`` on the CPU (the tiny random one for a null path)."""
        if self.dit_path is None:
            from t3.models.tiny import tiny_dit

            return tiny_dit(self.seed)
        return load_dit(self.dit_path, preset=self.preset, dtype=dtype, transform=False)

    def load_vae(self) -> torch.nn.Module:
        """The VAE in float32 on the CPU (the tiny random one for a null path)."""
        if self.vae_path is None:
            from t3.models.tiny import tiny_vae

            return tiny_vae(self.seed)
        return load_vae(self.vae_path, dtype=torch.float32)

    def load_text_encoder(self, dtype: torch.dtype) -> Any:
        """The text encoder in ``dtype`` on the CPU (the tiny random one for a null path)."""
        if self.text_encoder_path is None:
            from t3.models.tiny import tiny_text_encoder

            return tiny_text_encoder(self.seed).to(dtype=dtype)
        return load_text_encoder(self.text_encoder_path, dtype=dtype)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


def check_settings(settings: GenerationSettings, model: ModelPaths, schedule: Schedule) -> None:
    """Size and schedule checks from the config alone (no weights), with one-line errors."""
    spec = get_spec(model.preset)
    grid = spec.video_token_grid(settings.frames, settings.height, settings.width)  # legal, within RoPE
    try:
        spec.check_schedule(schedule, grid)  # made for this model, fits the grid
    except ValueError as err:
        raise ValueError(f"t3={schedule.name!r} does not fit {spec.name} at grid {grid}: {err}") from None


def check_parallel(
    parallel: ParallelConfig, settings: GenerationSettings, model: ModelPaths, world_size: int
) -> None:
    """Fail in one line naming the key if ``world_size`` processes cannot form SP groups of
    ``parallel.sequence_parallel_size`` ranks, such a group cannot shard the video's token grid (with
    ``parallel.align=frames``: more ranks than latent frames), or ``generation.device`` names one GPU for
    all processes; from the config alone, before any process group or model."""
    from t3.parallel.settings import check_parallel_settings

    device = resolve_device(settings.device)
    if world_size > 1 and device.type == "cuda" and device.index is not None:
        raise fail(
            "generation.device", settings.device,
            f"names one GPU for all {world_size} processes; under torchrun use cuda or auto (each its LOCAL_RANK GPU)",
        )  # fmt: skip
    grid = get_spec(model.preset).video_token_grid(settings.frames, settings.height, settings.width)
    check_parallel_settings(
        parallel.sequence_parallel_size, parallel.align, parallel.policy, parallel.max_imbalance,
        grid=grid, world_size=world_size,
    )  # fmt: skip


# --- scoring ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FvdI3DNode:
    """``metrics.fvd_i3d``: the FVD metric and the clip protocol both FVD metrics share (see `FVDSettings`)."""

    enabled: bool = True
    weights: str | None = None
    sha256: str | None = None
    num_frames: int = 16
    fps: float = 16.0
    start: int = 0
    size: int = 224
    batch_size: int = 8

    def __post_init__(self) -> None:
        check_field_types(self, "metrics.fvd_i3d")


@dataclass(frozen=True)
class FvdCrop224Node:
    """``metrics.fvd_i3d_crop224``: FVD on full-resolution tiles (see `FVDSettings`)."""

    enabled: bool = True
    tiles_per_video: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        check_field_types(self, "metrics.fvd_i3d_crop224")


@dataclass(frozen=True)
class ClipNode:
    """``metrics.vtc_clip``: CLIP text-video consistency (see `ScoreSettings`)."""

    enabled: bool = True
    weights: str | None = None
    num_frames: int = 8

    def __post_init__(self) -> None:
        check_field_types(self, "metrics.vtc_clip")


@dataclass(frozen=True)
class MetricsConfig:
    """The ``metrics`` config node (``conf/metrics/default.yaml``), one field per sub-node."""

    fvd_i3d: FvdI3DNode = field(default_factory=FvdI3DNode)
    fvd_i3d_crop224: FvdCrop224Node = field(default_factory=FvdCrop224Node)
    vtc_clip: ClipNode = field(default_factory=ClipNode)
    vtc_viclip: ViClipSettings = field(default_factory=ViClipSettings)
    vqa_dover: DoverSettings = field(default_factory=DoverSettings)
    device: str = "auto"


@dataclass(frozen=True)
class FVDSettings:
    """``metrics.fvd_i3d`` and ``metrics.fvd_i3d_crop224`` (see `t3.eval.metrics.fvd` for the protocol).

    Attributes:
        weights: Local ``i3d_torchscript.pt`` (None: both FVD metrics are skipped).
        sha256: Expected sha256 of ``weights``; None records the actual one with a warning.
        enabled: Compute ``fvd_i3d``.
        tiled: Compute ``fvd_i3d_crop224``.
        num_frames: Frames per clip (16).
        fps: Effective frame rate of the clips on both sides (16; see `t3.eval.metrics.fvd`).
        start: First frame of the clip, in frames at ``fps`` (0).
        size: Resize target / tile size (224).
        tiles_per_video: Full-resolution tiles per video for ``fvd_i3d_crop224``.
        tile_seed: Seed of the tile positions.
        batch_size: Clips per detector call.
        num_features: Detector feature size (400 for the I3D).
    """

    weights: str | None = None
    sha256: str | None = None
    enabled: bool = True
    tiled: bool = True
    num_frames: int = 16
    fps: float = 16.0
    start: int = 0
    size: int = 224
    tiles_per_video: int = 4
    tile_seed: int = 0
    batch_size: int = 8
    num_features: int = I3D_NUM_FEATURES

    def __post_init__(self) -> None:
        if not self.fps > 0:
            raise ValueError(f"metrics.fvd_i3d.fps must be > 0, got {self.fps}")
        if self.num_frames < 1 or self.start < 0:
            raise ValueError(
                f"metrics.fvd_i3d.num_frames must be >= 1 and .start >= 0, got {self.num_frames}, {self.start}"
            )

    def protocol(self) -> dict[str, Any]:
        return {
            "detector": "StyleGAN-V i3d_torchscript.pt (tf.hub deepmind/i3d-kinetics-400/1), Kinetics-400 logits",
            "detector_kwargs": dict(DETECTOR_KWARGS),
            "fps": self.fps,
            "clip": (
                f"{self.num_frames} frames at {self.fps:g} fps from effective frame {self.start}: the video frame "
                "nearest each clip time, at the video's own rate (generated: its content_fps)"
            ),
            "input": "float32 [B, 3, T, H, W] in [-1, 1] (x / 127.5 - 1 of uint8 RGB)",
            "statistics": "mean and unbiased covariance (N-1), float64; torchmetrics Frechet distance",
        }


@dataclass(frozen=True)
class ScoreSettings:
    """The ``metrics`` config node.

    Attributes:
        fvd: FVD settings.
        clip_weights: Local CLIP folder for ``vtc_clip`` (None: skipped).
        clip_enabled: Compute ``vtc_clip``.
        clip_num_frames: Frames per video for ``vtc_clip``.
        viclip: ``vtc_viclip`` through a local VBench checkout (`t3.eval.metrics.vtc`).
        dover: ``vqa_dover*`` through a local DOVER checkout (`t3.eval.metrics.vqa`).
        device: ``auto`` (CUDA if available) or a device name.
        require_complete: Refuse to score while some videos of the run are missing.
    """

    fvd: FVDSettings = field(default_factory=FVDSettings)
    clip_weights: str | None = None
    clip_enabled: bool = True
    clip_num_frames: int = 8
    viclip: ViClipSettings = field(default_factory=ViClipSettings)
    dover: DoverSettings = field(default_factory=DoverSettings)
    device: str = "auto"
    require_complete: bool = True

    @classmethod
    def from_metrics(cls, metrics: MetricsConfig, *, require_complete: bool = True) -> ScoreSettings:
        """The stage's settings from the ``metrics`` node: both FVD metrics share one `FVDSettings`."""
        fvd, tiled, clip = metrics.fvd_i3d, metrics.fvd_i3d_crop224, metrics.vtc_clip
        return cls(
            fvd=FVDSettings(
                weights=fvd.weights,
                sha256=fvd.sha256,
                enabled=fvd.enabled,
                tiled=tiled.enabled,
                num_frames=fvd.num_frames,
                fps=fvd.fps,
                start=fvd.start,
                size=fvd.size,
                tiles_per_video=tiled.tiles_per_video,
                tile_seed=tiled.seed,
                batch_size=fvd.batch_size,
            ),
            clip_weights=clip.weights,
            clip_enabled=clip.enabled,
            clip_num_frames=clip.num_frames,
            viclip=metrics.vtc_viclip,
            dover=metrics.vqa_dover,
            device=metrics.device,
            require_complete=require_complete,
        )


# --- speed ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpeedSettings:
    """The ``speed`` config node.

    Attributes:
        warmup: Untimed calls before each measurement.
        repeats: Timed calls; the median is reported.
        macs_only: Count MACs only (no model is built; any size runs on a CPU).
        attention: Time the attention op alone for the attention share.
        memory: Measure the peak memory of one DiT step.
        e2e: Measure end to end (needs ``model.vae_path`` and ``model.text_encoder_path``; the tiny
            preset's null paths build its random parts).
        e2e_steps: Sampler steps of the end-to-end run; None = ``generation.steps``.
    """

    warmup: int = 1
    repeats: int = 3
    macs_only: bool = False
    attention: bool = True
    memory: bool = True
    e2e: bool = True
    e2e_steps: int | None = None

    def __post_init__(self) -> None:
        check_field_types(self, "speed")
        if self.warmup < 0 or self.repeats < 1:
            raise ValueError(
                f"speed.warmup must be >= 0 and speed.repeats >= 1, got {self.warmup}, {self.repeats}"
            )
        if self.e2e_steps is not None and self.e2e_steps < 1:
            raise ValueError(f"speed.e2e_steps must be >= 1 or null, got {self.e2e_steps}")


# --- reading the eval config --------------------------------------------------------------------------------


def _dit_path(cfg: DictConfig) -> str | None:
    return cfg.ckpt if cfg.ckpt is not None else OmegaConf.select(cfg, "model.dit_path")


def model_paths(cfg: DictConfig) -> ModelPaths:
    """`ModelPaths` of the ``model`` node, ``ckpt`` overriding ``model.dit_path``."""
    # select() reads a mandatory-but-unset value (``dit_path: ???``) as None: the dry run and the MAC
    # count need no weights, and generation names the missing key itself.
    return ModelPaths(
        preset=cfg.model.preset,
        dit_path=_dit_path(cfg),
        vae_path=OmegaConf.select(cfg, "model.vae_path"),
        text_encoder_path=OmegaConf.select(cfg, "model.text_encoder_path"),
        seed=OmegaConf.select(cfg, "model.seed", default=0),
    )


def generation_settings(cfg: DictConfig) -> GenerationSettings:
    """`GenerationSettings` of the ``generation`` node, with the attention settings of the ``model`` node."""
    values = _plain(cfg.generation)
    if "backend" in values:
        raise ValueError(
            "generation.backend: unknown key; the T3 attention backend is model.attention_backend"
        )
    values["backend"] = OmegaConf.select(cfg, "model.attention_backend", default="auto")
    values["tokens_per_call"] = OmegaConf.select(cfg, "model.attention_tokens_per_call", default=None)
    if "seeds" in values:
        values["seeds"] = tuple(values["seeds"])
    return from_node(GenerationSettings, values, "generation")


def parallel_settings(cfg: DictConfig) -> ParallelConfig:
    """`ParallelConfig` of the ``parallel`` node (the defaults where a config has none), type-checked."""
    parallel = from_node(ParallelConfig, OmegaConf.select(cfg, "parallel", default=None), "parallel")
    check_field_types(parallel, "parallel")
    return parallel


def score_settings(cfg: DictConfig) -> ScoreSettings:
    """`ScoreSettings` of the ``metrics`` node (read as a `MetricsConfig`) and ``score.require_complete``."""
    metrics = from_node(MetricsConfig, cfg.metrics, "metrics")
    return ScoreSettings.from_metrics(metrics, require_complete=cfg.score.require_complete)


def speed_settings(cfg: DictConfig) -> tuple[SpeedSettings, str]:
    """`SpeedSettings` of the ``speed`` node, and its ``out_dir``."""
    values = _plain(cfg.speed)
    out_dir = values.pop("out_dir")
    return from_node(SpeedSettings, values, "speed"), out_dir

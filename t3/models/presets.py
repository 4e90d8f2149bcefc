"""Named model configurations: the DiT architecture and the VAE geometry of each supported model.

A preset name (``"wan2.1-t2v-1.3b"``, ``"wan2.2-ti2v-5b"``, ``"tiny"``) is the one handle the rest of the
codebase uses to talk about a model family. From it follow

* the keyword arguments of :class:`diffusers.WanTransformer3DModel` (:data:`DIT_PRESETS`), needed to
  load checkpoints in the original Wan key format, which carry no config of their own;
* the VAE facts (latent channels, spatial/temporal stride) that decide which pixel sizes are legal.

The spec is the one owner of the size facts: which video sizes a model takes (`ModelSpec.check_video_size`,
whose errors name the nearest valid sizes), their latent shape (`ModelSpec.latent_shape`) and token grid
(`ModelSpec.video_token_grid`, `ModelSpec.token_grid`). Everything else asks it instead of dividing by
strides and patch sizes itself.

The real values are those of the Wan releases (their ``config.json``) and of the diffusers ports
(``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``, ``Wan-AI/Wan2.2-TI2V-5B-Diffusers``).
"""

from __future__ import annotations

import copy
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = [
    "DIT_PRESETS",
    "MODEL_SPECS",
    "ModelSpec",
    "dit_config",
    "get_spec",
    "nearest_valid",
    "preset_names",
]

# Settings shared by every Wan DiT we support (text-to-video and text-image-to-video, no image branch).
_WAN_COMMON: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "attention_head_dim": 128,
    "text_dim": 4096,  # umT5-XXL hidden size
    "freq_dim": 256,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "image_dim": None,
    "added_kv_proj_dim": None,
    "rope_max_seq_len": 1024,
    "pos_embed_seq_len": None,
}

#: ``WanTransformer3DModel(**DIT_PRESETS[name])`` builds the architecture of each preset.
DIT_PRESETS: dict[str, dict[str, Any]] = {
    # Wan2.1-T2V-1.3B: dim 1536 = 12 heads x 128.
    "wan2.1-t2v-1.3b": {
        **_WAN_COMMON,
        "num_attention_heads": 12,
        "in_channels": 16,
        "out_channels": 16,
        "ffn_dim": 8960,
        "num_layers": 30,
    },
    # Wan2.2-TI2V-5B: dim 3072 = 24 heads x 128, works on the 48-channel Wan2.2 VAE latents.
    "wan2.2-ti2v-5b": {
        **_WAN_COMMON,
        "num_attention_heads": 24,
        "in_channels": 48,
        "out_channels": 48,
        "ffn_dim": 14336,
        "num_layers": 30,
    },
    # Test-sized model that builds in milliseconds. Head dim 12 keeps the 3D RoPE split (t, h, w) = (4, 4, 4)
    # valid; 5 layers leave room for per-layer attention patterns in tests; in/out 4 = tiny VAE z_dim;
    # text_dim 16 = tiny text encoder d_model (see t3.models.tiny).
    "tiny": {
        **_WAN_COMMON,
        "num_attention_heads": 2,
        "attention_head_dim": 12,
        "in_channels": 4,
        "out_channels": 4,
        "text_dim": 16,
        "freq_dim": 16,
        "ffn_dim": 32,
        "num_layers": 5,
        "rope_max_seq_len": 32,
    },
}


@dataclass(frozen=True)
class ModelSpec:
    """Everything downstream code needs to know about a model family besides its weights.

    Attributes:
        name: Preset name, a key of :data:`DIT_PRESETS`.
        dit_config: ``WanTransformer3DModel`` keyword arguments (read-only; :func:`dit_config` gives a copy).
        vae_channels: Latent channels of the matching VAE (= DiT ``in_channels``).
        vae_stride: VAE compression ``(t, h, w)``: a video of ``1 + 4k`` frames and ``H x W`` pixels becomes
            ``1 + k`` latent frames of ``H / s_h x W / s_w``.
        patch_size: DiT patch size ``(t, h, w)`` applied to the latents.
        text_len: Number of text tokens the DiT is trained with (prompts are padded/truncated to it).
        text_dim: Text-encoder hidden size (DiT ``text_dim``).
        frame_rate: Frames per second of the motion the model generates: the Wan release's ``sample_fps``
            (16 for Wan2.1, 24 for Wan2.2-TI2V-5B), whatever rate an mp4 of its frames is labelled with.
    """

    name: str
    dit_config: Mapping[str, Any] = field(repr=False, hash=False)
    vae_channels: int
    vae_stride: tuple[int, int, int] = (4, 8, 8)
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_len: int = 512
    text_dim: int = 4096
    frame_rate: float = 16.0

    @property
    def dim(self) -> int:
        """DiT hidden size (heads x head dim)."""
        return self.dit_config["num_attention_heads"] * self.dit_config["attention_head_dim"]

    @property
    def pixel_multiple(self) -> int:
        """Height and width must be multiples of this (VAE stride x DiT patch): 16 for Wan2.1, 32 for Wan2.2."""
        return self.vae_stride[1] * self.patch_size[1]

    @property
    def frame_multiple(self) -> int:
        """Frame counts must be ``1 + frame_multiple * k`` (the VAE keeps the first frame on its own)."""
        return self.vae_stride[0] * self.patch_size[0]

    @property
    def token_size(self) -> tuple[int, int, int]:
        """Frames x pixels x pixels one token covers (VAE stride x patch size): 4x16x16 for Wan2.1, 4x32x32
        for Wan2.2."""
        return tuple(v * p for v, p in zip(self.vae_stride, self.patch_size, strict=True))  # type: ignore[return-value]

    @property
    def layout(self) -> str:
        """The layout a T3 schedule can be made for, in words: layers, heads, patch size, VAE stride."""
        c = self.dit_config
        return (
            f"{c['num_layers']} layers, {c['num_attention_heads']} heads, patch {_by(self.patch_size)}, "
            f"VAE stride {_by(self.vae_stride)}"
        )

    def check_video_size(
        self, num_frames: int, height: int, width: int, names: Sequence[str] = ("frames", "height", "width")
    ) -> None:
        """Check that this model takes videos of ``num_frames x height x width``, before any model work.

        Height and width must be multiples of `pixel_multiple` (16 for Wan2.1, 32 for Wan2.2) and the
        frame count of the form ``frame_multiple * k + 1``. The authors' 4K size, 2176 x 3840 with 81
        frames, is valid for both. ``names`` are what the messages call the three values (a config's
        keys, e.g. ``data.num_frames``).

        Raises:
            ValueError: Naming each bad value and the nearest valid ones, e.g. ``height 2160 is not a
                multiple of 32 for wan2.2-ti2v-5b; nearest valid: 2144 or 2176``.
        """
        frames_name, height_name, width_name = names
        sizes = ((height_name, height), (width_name, width), (frames_name, num_frames))
        problems = [
            f"{name} must be a positive integer, got {value!r}"
            for name, value in sizes
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1
        ]
        if not problems:
            for name, value in sizes[:2]:
                if value % self.pixel_multiple:
                    problems.append(
                        f"{name} {value} is not a multiple of {self.pixel_multiple} for {self.name}; "
                        f"nearest valid: {_either(nearest_valid(value, self.pixel_multiple))}"
                    )
            if (num_frames - 1) % self.frame_multiple:
                problems.append(
                    f"{frames_name} {num_frames} is not of the form {self.frame_multiple}k+1 for {self.name}; "
                    f"nearest valid: {_either(nearest_valid(num_frames, self.frame_multiple, offset=1))}"
                )
        if problems:
            raise ValueError("; ".join(problems))

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """Latent ``(C, T, H, W)`` of a ``num_frames x height x width`` video.

        Raises:
            ValueError: If the video size is not legal for this model (`check_video_size`).
        """
        self.check_video_size(num_frames, height, width)
        st, sh, sw = self.vae_stride
        return (self.vae_channels, (num_frames - 1) // st + 1, height // sh, width // sw)

    def video_size(self, latent_shape: Sequence[int]) -> tuple[int, int, int]:
        """``(num_frames, height, width)`` of the videos whose latents are ``[C, T', H', W']`` (the
        inverse of `latent_shape`)."""
        _, t, h, w = (int(n) for n in latent_shape)
        st, sh, sw = self.vae_stride
        return ((t - 1) * st + 1, h * sh, w * sw)

    @property
    def max_grid_axis(self) -> int:
        """Most token positions per grid axis: the DiT's rotary embedding covers ``rope_max_seq_len`` per axis."""
        return int(self.dit_config["rope_max_seq_len"])

    def token_grid(self, latent_shape: Sequence[int]) -> tuple[int, int, int]:
        """Post-patch token grid ``(T, H, W)`` of latents ``[C, T', H', W']``, checked against the DiT.

        Raises:
            ValueError: If the DiT cannot take these latents: another channel count than the VAE's, a latent
                axis that is not a multiple of the patch size, or an axis longer than the rotary embedding
                covers (diffusers would fail deep inside the forward).
        """
        shape = tuple(int(n) for n in latent_shape)
        if len(shape) != 4 or min(shape) < 1:
            raise ValueError(f"latents must be [C, T, H, W] with positive sizes, got {list(shape)}")
        if shape[0] != self.vae_channels:
            raise ValueError(
                f"latents {list(shape)} have {shape[0]} channels, {self.name} takes {self.vae_channels}"
            )
        if any(n % p for n, p in zip(shape[1:], self.patch_size, strict=True)):
            raise ValueError(
                f"latents {list(shape)}: T, H, W must be multiples of {self.name}'s patch size {self.patch_size}"
            )
        grid = tuple(n // p for n, p in zip(shape[1:], self.patch_size, strict=True))
        if max(grid) > self.max_grid_axis:
            raise ValueError(
                f"latents {list(shape)} give the token grid {grid}, but {self.name}'s rotary embedding covers "
                f"at most {self.max_grid_axis} positions per axis (rope_max_seq_len)"
            )
        return grid  # type: ignore[return-value]

    def video_token_grid(
        self, num_frames: int, height: int, width: int, names: Sequence[str] = ("frames", "height", "width")
    ) -> tuple[int, int, int]:
        """`token_grid` of a ``num_frames x height x width`` video (``names`` as in `check_video_size`).

        Raises:
            ValueError: If the size is not legal for this model, or its grid exceeds the rotary embedding;
                the message then names the longest axis and gives the largest size the model takes.
        """
        self.check_video_size(num_frames, height, width, names)
        latent = self.latent_shape(num_frames, height, width)
        try:
            return self.token_grid(latent)
        except ValueError as err:
            frames_max = (self.max_grid_axis * self.patch_size[0] - 1) * self.vae_stride[0] + 1
            positions = [n // p for n, p in zip(latent[1:], self.patch_size, strict=True)]
            longest = max(range(3), key=positions.__getitem__)
            raise ValueError(
                f"{names[longest]} {(num_frames, height, width)[longest]}: {self.name}: {height}x{width}x{num_frames}: "
                f"{err}; accepted: height and width at most {self.max_grid_axis * self.pixel_multiple}, frames at "
                f"most {frames_max}"
            ) from None

    def check_schedule(self, schedule: Any, grid: tuple[int, int, int]) -> Any:
        """Check that the T3 ``schedule`` was made for this model and fits its token ``grid``.

        A schedule made for a model preset (``made_for.model``) needs that preset's layout (`layout`); one
        made for a token size (``made_for.token_size``) needs this model's `token_size`; one made for a
        grid refuses any other (`t3.attention.Schedule.check_fixed_grid`), and every plan must fit the grid.

        Returns:
            The schedule's `t3.attention.schedule.Padding` on ``grid`` over this model's layers.

        Raises:
            ValueError: One line naming the schedule, what it was made for and this model.
        """
        made_for = schedule.made_for
        if made_for is not None and made_for.model is not None and made_for.model != self.name:
            target = get_spec(made_for.model)
            if target.layout != self.layout:
                raise ValueError(
                    f"schedule {schedule.name!r} was made for {target.name} ({target.layout}), not for "
                    f"{self.name} ({self.layout})"
                )
        if (
            made_for is not None
            and made_for.token_size is not None
            and made_for.token_size != self.token_size
        ):
            raise ValueError(
                f"schedule {schedule.name!r} counts its windows in tokens of {_by(made_for.token_size)} "
                f"frames x pixels, {self.name}'s tokens are {_by(self.token_size)}: its windows would cover "
                f"another part of the video than they were made for"
            )
        return schedule.padding_report(grid, int(self.dit_config["num_layers"]))


#: One :class:`ModelSpec` per preset.
MODEL_SPECS: dict[str, ModelSpec] = {
    # Wan2.1 VAE: 16 channels, 4x8x8 compression.
    "wan2.1-t2v-1.3b": ModelSpec(
        name="wan2.1-t2v-1.3b",
        dit_config=MappingProxyType(DIT_PRESETS["wan2.1-t2v-1.3b"]),
        vae_channels=16,
        vae_stride=(4, 8, 8),
        frame_rate=16.0,  # Wan2.1 wan/configs/shared_config.py: sample_fps = 16
    ),
    # Wan2.2 VAE: 48 channels, 4x16x16 compression.
    "wan2.2-ti2v-5b": ModelSpec(
        name="wan2.2-ti2v-5b",
        dit_config=MappingProxyType(DIT_PRESETS["wan2.2-ti2v-5b"]),
        vae_channels=48,
        vae_stride=(4, 16, 16),
        frame_rate=24.0,  # Wan2.2 wan/configs/wan_ti2v_5B.py: sample_fps = 24
    ),
    # Tiny VAE (t3.models.tiny.tiny_vae): 4 channels, three down-sampling stages like Wan2.1.
    "tiny": ModelSpec(
        name="tiny",
        dit_config=MappingProxyType(DIT_PRESETS["tiny"]),
        vae_channels=4,
        vae_stride=(4, 8, 8),
        text_len=512,
        text_dim=16,
    ),
}


def nearest_valid(value: int, multiple: int, offset: int = 0) -> list[int]:
    """The valid sizes ``offset + k * multiple`` (``k >= 0``, size ``>= 1``) on either side of ``value``."""
    below = offset + (value - offset) // multiple * multiple
    candidates = [c for c in (below, below + multiple) if c >= max(1, offset)]
    return candidates or [max(multiple, offset)]


def _by(sizes: Sequence[int]) -> str:
    return "x".join(str(n) for n in sizes)


def _either(candidates: Sequence[int]) -> str:
    return " or ".join(str(c) for c in candidates)


def preset_names() -> list[str]:
    """Sorted list of accepted preset names."""
    return sorted(MODEL_SPECS)


def get_spec(name: str) -> ModelSpec:
    """Look up a preset by name (case-insensitive).

    Raises:
        ValueError: For an unknown name; the message lists the accepted names.
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in MODEL_SPECS:
        raise ValueError(f"Unknown model preset {name!r}; expected one of {preset_names()}")
    return MODEL_SPECS[key]


def dit_config(name: str) -> dict[str, Any]:
    """A private (deep) copy of the ``WanTransformer3DModel`` kwargs of preset ``name``."""
    return copy.deepcopy(dict(get_spec(name).dit_config))

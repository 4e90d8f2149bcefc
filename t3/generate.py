"""Text-to-video generation with a (T3-transformed) Wan DiT.

The loop follows diffusers' ``WanPipeline``: umT5 prompt embeddings zero-padded to 512 tokens, Gaussian
latents ``[B, C, 1 + (F - 1) / 4, H / s, W / s]``, a flow-matching scheduler with classifier-free guidance,
then the VAE decode of ``latents * latents_std + latents_mean``. Differences, all deliberate:

* prompt embeddings come from a `PromptEmbeddingCache`, so a prompt (or the negative prompt) is never
  encoded twice, across batches and across `generate` calls on the same `T2VGenerator`;
* the conditional and unconditional passes run as one batched forward (`t3.diffusion.sample`);
* prompt ``i`` of a call always gets its own noise from seed ``seed + i`` drawn on CPU, so a video does not
  depend on the batch size, its position in a batch, or the device;
* sizes are checked up front with an error that names the nearest valid sizes, instead of being rounded
  silently;
* the DiT always gets one timestep per video. The Wan2.2-TI2V-5B pipeline's ``expand_timesteps`` mode
  (one timestep per token) only matters when a conditioning frame is kept at ``t = 0``; for text-to-video
  every token has the same timestep and the two give the same prediction.

Sequence parallelism (``torchrun``, one video across the ``sp`` ranks of an SP group): give every rank of
the group a `T2VGenerator` with ``sp_group`` (`t3.parallel.build_parallel_groups(sp).sp_group`) and call
`generate` on every rank with the same prompts and seed. The DiT runs under
`t3.parallel.apply_sequence_parallel`, every rank draws the same noise and gets the same latents; only the
group's rank 0 encodes the prompts (the others receive the embeddings by broadcast) and decodes and writes
the videos (the others need neither a text encoder nor a VAE: pass None) while its peers wait at a group
barrier. With several SP groups (data parallelism), give each group its own prompts and seeds, as the eval
stage does (`t3.eval.generate_stage`).

`t3.wan_pipeline.make_wan_pipeline` assembles a plain diffusers ``WanPipeline`` around a transformed DiT for
anyone who wants the diffusers API instead.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from diffusers.schedulers.scheduling_utils import SchedulerMixin

import t3
from t3.attention import Schedule
from t3.diffusion import build_scheduler, sample
from t3.memory import check_inference_memory
from t3.models import (
    ModelSpec,
    PromptEmbeddingCache,
    TextEncoder,
    decode_latents,
    get_spec,
    load_text_encoder,
)
from t3.models.build import cast_dit
from t3.parallel import DEFAULT_MAX_IMBALANCE, apply_sequence_parallel, check_sequence_parallel
from t3.transform import schedule_of
from t3.video_io import pixels_to_uint8, write_video

__all__ = [
    "WAN_NEGATIVE_PROMPT",
    "GenerationResult",
    "T2VGenerator",
    "Timings",
    "cfg_batch",
    "generate",
    "video_file_name",
]

logger = logging.getLogger(__name__)

#: The standard Wan negative prompt (``sample_neg_prompt`` in the official Wan2.1/Wan2.2 configs, also used in
#: the Wan-AI Diffusers model cards). diffusers 0.42.1's own docstrings only carry an English paraphrase.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，"
    "最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，"
    "画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，"
    "杂乱的背景，三条腿，背景人很多，倒着走"
)


def _as_spec(spec_or_preset: ModelSpec | str) -> ModelSpec:
    return spec_or_preset if isinstance(spec_or_preset, ModelSpec) else get_spec(spec_or_preset)


def cfg_batch(guidance_scale: float, videos: int = 1) -> int:
    """Samples per DiT forward: classifier-free guidance (scale > 1) runs both passes as one batch."""
    return videos * (2 if guidance_scale > 1.0 else 1)


# --- results ----------------------------------------------------------------------------------------------


@dataclass
class Timings:
    """Wall-clock seconds of the stages that produced one result (CUDA is synchronised before reading).

    ``text_encoding`` and ``denoising`` are those of the whole batch the result was generated in (shared by
    its `GenerationResult.batch_size` videos); ``decode`` and ``write`` are this video's own.
    """

    text_encoding: float = 0.0
    denoising: float = 0.0
    decode: float = 0.0
    write: float = 0.0

    @property
    def total(self) -> float:
        return self.text_encoding + self.denoising + self.decode + self.write


@dataclass
class GenerationResult:
    """One generated video.

    Attributes:
        index: Position of the prompt in the `generate` call.
        prompt: The prompt.
        seed: The seed of its initial noise (``seed + index``).
        latents: Final normalised latents ``[C, T, H, W]`` (float32, CPU) if ``latents_only`` or
            ``return_latents``; else None.
        frames: Decoded uint8 frames ``[F, H, W, 3]`` when decoded but not written (no ``out_dir``); else None.
        video_path: The mp4 written under ``out_dir``; else None.
        batch_size: Number of videos in the batch it was generated with.
        timings: Seconds per stage.
    """

    index: int
    prompt: str
    seed: int
    latents: torch.Tensor | None = None
    frames: np.ndarray | None = None
    video_path: Path | None = None
    batch_size: int = 1
    timings: Timings = field(default_factory=Timings)


def video_file_name(index: int, seed: int) -> str:
    """File name of the video of prompt ``index``: from the index and seed, never from the prompt text."""
    return f"video_{index:05d}_seed{seed}.mp4"


# --- the generator ----------------------------------------------------------------------------------------


class T2VGenerator:
    """The loaded parts of a text-to-video model, ready to `generate` with.

    The DiT is transformed in place with ``t3.transform(dit, schedule, backend)`` unless ``schedule`` is
    None or ``"none"``. ``"dense"`` still transforms (full attention through the T3 op), so dense vs T3
    comparisons run the same code path. By default (``"recorded"``) the schedule is the one the DiT's T3
    record names (`t3.models.record`: a t3 export, or a model transformed before), else ``dense``.

    Args:
        dit: A diffusers ``WanTransformer3DModel`` (e.g. from `t3.models.load_dit`).
        vae: The matching ``AutoencoderKLWan`` (from `t3.models.load_vae`); may be None for ``latents_only``
            and on the ranks of an SP group other than its rank 0 (which never decode; a VAE given there is
            dropped, never moved to the device).
        text_encoder: A `t3.models.TextEncoder` (from `t3.models.load_text_encoder`) or a path to load one
            from. May be None when ``embedding_cache`` already holds every prompt, and on the ranks of an
            SP group other than its rank 0 (which receive the embeddings from it). It runs on whatever
            device it is on: move it with ``text_encoder.to(...)``.
        spec: The model's `ModelSpec` or preset name; decides the legal sizes and the latent shape.
        schedule: A T3 `Schedule`, a preset name, ``"recorded"`` (see above), or None/``"none"`` to
            leave the DiT as it is.
        backend: T3 attention backend (``auto``, ``sdpa``, ``flash``).
        tokens_per_call: bound on the gathered slots per T3 attention call (memory at 4K); None: automatic.
        scheduler: ``"unipc"`` (Wan's default sampler), ``"diffsynth_euler"`` (the T3 authors'), ``"euler"``, or a
            diffusers scheduler instance (`t3.diffusion.build_scheduler`).
        flow_shift: Timestep shift of the sampler (Wan: 5.0 for 720p, 3.0 for 480p).
        dtype: Compute dtype of the DiT (it is cast if needed, keeping its fp32 modules). The VAE keeps
            its own dtype (Wan runs it in float32).
        device: Device for the DiT and the VAE.
        embedding_cache: A `PromptEmbeddingCache` to share (e.g. one backed by a disk folder); by default
            the generator makes an in-memory one.
        vae_tiling: Decode in spatial tiles when frames are larger than a tile (needed at 4K).
        allow_schedule_change: Use ``schedule`` even where the DiT's T3 record names another one.
        sp_group: The SP process group of this rank (`t3.parallel.ParallelGroups.sp_group`): the DiT runs
            sequence-parallel over its ranks (see the module docstring); None: on this process alone.
        sp_align, sp_policy, sp_max_imbalance: How shards are cut and attention work is assigned
            (`t3.parallel.apply_sequence_parallel`; ``parallel.align`` ... in the configs).

    Raises:
        ValueError: If the DiT does not match ``spec`` (latent channels or patch size), or ``sp_group`` is
            given with ``schedule=None`` (sequence parallelism runs a transformed DiT; ``"dense"`` for
            full attention).
        t3.models.record.ScheduleConflictError: ``schedule`` differs from the DiT's recorded one.
    """

    def __init__(
        self,
        dit: torch.nn.Module,
        vae: torch.nn.Module | None,
        text_encoder: TextEncoder | str | os.PathLike | None,
        *,
        spec: ModelSpec | str,
        schedule: Schedule | str | None = "recorded",
        backend: str = "auto",
        tokens_per_call: int | None = None,
        scheduler: str | SchedulerMixin = "unipc",
        flow_shift: float = 5.0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        embedding_cache: PromptEmbeddingCache | None = None,
        vae_tiling: bool = True,
        allow_schedule_change: bool = False,
        sp_group: dist.ProcessGroup | None = None,
        sp_align: str = "tokens",
        sp_policy: str = "auto",
        sp_max_imbalance: float = DEFAULT_MAX_IMBALANCE,
    ) -> None:
        self.spec = _as_spec(spec)
        config = dit.config
        if (
            int(config.in_channels) != self.spec.vae_channels
            or tuple(config.patch_size) != self.spec.patch_size
        ):
            raise ValueError(
                f"the DiT (in_channels {config.in_channels}, patch {tuple(config.patch_size)}) does not match "
                f"model spec {self.spec.name} (latent channels {self.spec.vae_channels}, patch {self.spec.patch_size})"
            )
        if vae is not None and int(vae.config.z_dim) != self.spec.vae_channels:
            raise ValueError(
                f"the VAE has z_dim {vae.config.z_dim} but model spec {self.spec.name} expects "
                f"{self.spec.vae_channels} latent channels"
            )
        if isinstance(schedule, str) and schedule.lower() == "none":
            schedule = None
        if sp_group is not None and schedule is None:
            raise ValueError(
                "sequence parallelism runs a T3-transformed DiT: give T2VGenerator a schedule "
                "('dense' for full attention), not None"
            )
        self.device = torch.device(device)
        self.dtype = dtype

        if cast_dit(dit, dtype):
            logger.info("cast the DiT to %s (fp32 modules kept)", dtype)
        self.dit = dit.to(self.device).eval().requires_grad_(False)
        if isinstance(schedule, str) and schedule == "recorded":
            from t3.models.record import T3Record

            record = T3Record.from_config(self.dit.config)
            schedule = "dense" if record is None else record.schedule
        if schedule is not None:
            t3.transform(
                self.dit,
                schedule,
                backend=backend,
                tokens_per_call=tokens_per_call,
                allow_schedule_change=allow_schedule_change,
            )
        self.schedule = schedule_of(self.dit)

        self.sp_group = sp_group
        self.sp_size = dist.get_world_size(sp_group) if sp_group is not None else 1
        self.sp_rank = dist.get_rank(sp_group) if sp_group is not None else 0
        self.sp_align = sp_align
        if sp_group is not None:
            apply_sequence_parallel(
                self.dit, sp_group, align=sp_align, policy=sp_policy, max_imbalance=sp_max_imbalance
            )
        if not self.decodes:
            vae = text_encoder = None  # rank 0 of the SP group encodes and decodes for all of it
            embedding_cache = None

        self.vae = vae.to(self.device).eval().requires_grad_(False) if vae is not None else None
        self.vae_tiling = vae_tiling

        if isinstance(text_encoder, str | os.PathLike):
            text_encoder = load_text_encoder(text_encoder)
        self.text_encoder = text_encoder
        if embedding_cache is None and self.decodes:
            if text_encoder is None:
                raise ValueError(
                    "T2VGenerator needs a text_encoder or an embedding_cache holding the prompts"
                )
            embedding_cache = PromptEmbeddingCache(text_encoder, max_length=self.spec.text_len)
        self.embedding_cache = embedding_cache

        self.scheduler = (
            build_scheduler(scheduler, flow_shift=flow_shift) if isinstance(scheduler, str) else scheduler
        )
        logger.info(
            "T2VGenerator: %s, schedule %s, %s, %s on %s%s",
            self.spec.name,
            self.schedule.name if self.schedule is not None else "none (untransformed)",
            type(self.scheduler).__name__,
            dtype,
            self.device,
            f", sequence parallel rank {self.sp_rank} of {self.sp_size}" if sp_group is not None else "",
        )

    @property
    def decodes(self) -> bool:
        """Whether this process encodes prompts, decodes and writes videos: rank 0 of its SP group (or alone)."""
        return self.sp_rank == 0

    def latent_shape(self, height: int, width: int, frames: int) -> tuple[int, int, int, int]:
        """Latent ``(C, T, H, W)`` of one video; checks the size first (legal, within the RoPE table)."""
        self.spec.video_token_grid(frames, height, width)  # names the nearest valid sizes
        return self.spec.latent_shape(frames, height, width)

    def check_schedule(self, height: int, width: int, frames: int) -> None:
        """Fail now, naming the layer (or the SP key), if the T3 schedule cannot run on this video's token
        grid, or the SP group cannot shard it."""
        if self.schedule is None:
            return
        grid = self.spec.video_token_grid(frames, height, width)
        self.schedule.plans(grid, len(self.dit.blocks))
        check_sequence_parallel(grid, self.sp_size, self.sp_align)

    def check_memory(self, height: int, width: int, frames: int, batch: int) -> None:
        """Fail now, in one line, if a DiT forward on ``batch`` samples of this size cannot fit beside
        what is already loaded (`t3.memory.check_inference_memory`); under sequence parallelism, with this
        rank's share of the tokens."""
        check_inference_memory(
            self.spec, (height, width, frames), batch=batch, dtype=self.dtype, device=self.device,
            what="generate", instead="batch_size=1" if batch > 2 else "", weights_loaded=True,
            sequence_parallel=self.sp_size,
        )  # fmt: skip

    def embed(self, prompts: Sequence[str]) -> torch.Tensor:
        """Zero-padded prompt embeddings ``[B, text_len, dim]`` on the DiT's device and dtype (cached).

        Under sequence parallelism every rank of the group calls this together: rank 0 encodes and
        broadcasts, so the text encoder lives on one device per group."""
        if self.decodes:
            embeddings, _ = self.embedding_cache.get(list(prompts))
            embeddings = embeddings.to(self.device, self.dtype).contiguous()
        else:
            shape = (len(prompts), self.spec.text_len, int(self.dit.config.text_dim))
            embeddings = torch.empty(shape, device=self.device, dtype=self.dtype)
        if self.sp_group is not None:
            dist.broadcast(embeddings, src=dist.get_global_rank(self.sp_group, 0), group=self.sp_group)
        return embeddings

    def denoise_fn(self, x: torch.Tensor, timestep: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """The DiT as `t3.diffusion.sample` calls it: the flow prediction for ``x`` at ``timestep``."""
        return self.dit(x, timestep, return_dict=False, **kwargs)[0]


# --- generate ---------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    # Kernels run asynchronously on CUDA; without a sync the timings would only measure the launches.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def _timer(device: torch.device) -> Iterator[list[float]]:
    """Yields a one-element list that holds the elapsed seconds once the block exits."""
    elapsed = [0.0]
    _sync(device)
    start = time.perf_counter()
    try:
        yield elapsed
    finally:
        _sync(device)
        elapsed[0] = time.perf_counter() - start


def _prepare_out_dir(out_dir: str | os.PathLike) -> Path:
    """Create ``out_dir`` and prove it is writable, so a bad path fails before any model work."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"out_dir {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        # os.access lies for root and on read-only mounts; creating a file does not.
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise OSError(f"cannot write videos to out_dir {out}: {err.strerror or err}") from err
    return out


def _to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """``[3, F, H, W]`` in ``[-1, 1]`` -> uint8 ``[F, H, W, 3]`` (rounded, unlike diffusers' truncation)."""
    return pixels_to_uint8(video).permute(1, 2, 3, 0).contiguous().cpu().numpy()


def _as_prompt_list(prompts: str | Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("generate: no prompts given")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"generate: prompt {i} must be a str, got {type(p).__name__}")
    return prompts


def generate(
    prompts: str | Sequence[str],
    *,
    generator: T2VGenerator,
    height: int,
    width: int,
    frames: int,
    steps: int = 50,
    guidance_scale: float = 5.0,
    negative_prompt: str | None = WAN_NEGATIVE_PROMPT,
    seed: int = 0,
    fps: float = 16,
    out_dir: str | os.PathLike | None = None,
    latents_only: bool = False,
    batch_size: int = 1,
    return_latents: bool = False,
    progress: bool = True,
) -> list[GenerationResult]:
    """Generate one video per prompt.

    Seeds: prompt ``i`` (its position in ``prompts``) starts from noise drawn on CPU with seed ``seed + i``,
    so its video does not depend on ``batch_size`` or the device's RNG, and the same seed gives bit-identical
    latents on CPU. Use a disjoint seed range per call when sharding a prompt list.

    Under sequence parallelism (a generator made with ``sp_group``), every rank of the group calls this
    with the same arguments and gets the same latents; only the group's rank 0 decodes, writes into
    ``out_dir`` and returns frames or paths (the others' results carry the latents if asked, nothing
    else), and the group meets at a barrier after each batch.

    Args:
        prompts: A prompt or a list of prompts.
        generator: The loaded model (`T2VGenerator`).
        height: Frame height in pixels (a multiple of the model's `ModelSpec.pixel_multiple`).
        width: Frame width in pixels (likewise).
        frames: Number of frames, ``4k + 1``.
        steps: Sampler steps.
        guidance_scale: Classifier-free guidance scale; ``<= 1`` disables CFG (no negative prompt pass).
        negative_prompt: Prompt of the unconditional pass (Wan's standard one by default; None = ``""``).
        seed: Seed of prompt 0; prompt ``i`` uses ``seed + i``.
        fps: Frame rate of written videos.
        out_dir: Folder for the mp4s (created if missing), named by `video_file_name`; None keeps the decoded
            frames in the results instead.
        latents_only: Skip the VAE decode and writing (for speed measurements); results carry the latents.
        batch_size: Prompts denoised together (CFG doubles the DiT batch).
        return_latents: Also keep the final latents in the results when decoding.
        progress: Show a tqdm bar over the sampler steps.

    Returns:
        One `GenerationResult` per prompt, in order.

    Raises:
        ValueError: For an invalid size (naming the nearest valid ones) or one beyond the model's RoPE
            table, step count, batch size or fps, a T3 schedule that does not fit the token grid, an SP
            group that cannot shard it (`t3.parallel.LayoutError`, naming
            ``parallel.sequence_parallel_size``), or a DiT step that cannot fit in the device's free
            memory (`t3.memory.DoesNotFitError`), all before any model work.
        OSError: If ``out_dir`` cannot be created or written.
    """
    prompts = _as_prompt_list(prompts)
    gen = generator
    latent_shape = gen.latent_shape(height, width, frames)  # checks the size
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    gen.check_schedule(height, width, frames)
    gen.check_memory(height, width, frames, cfg_batch(guidance_scale, min(batch_size, len(prompts))))
    decode = not latents_only and gen.decodes  # under SP, rank 0 of the group decodes for all of it
    if decode and gen.vae is None:
        raise ValueError("generate: this T2VGenerator has no VAE; pass latents_only=True or give it a VAE")
    out = _prepare_out_dir(out_dir) if (out_dir is not None and decode) else None
    if out_dir is not None and latents_only:
        logger.info("latents_only: nothing is written to %s", out_dir)

    use_cfg = guidance_scale > 1.0
    negative = negative_prompt or ""
    logger.info(
        "generating %d video(s) of %dx%d x %d frames (latents %s): %d steps, guidance %.2f, batch %d, seeds %d..%d",
        len(prompts), width, height, frames, latent_shape, steps, guidance_scale, batch_size,
        seed, seed + len(prompts) - 1,
    )  # fmt: skip

    results: list[GenerationResult] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        size = len(batch)
        seeds = [seed + start + j for j in range(size)]

        with _timer(gen.device) as t_text:
            cond = {"encoder_hidden_states": gen.embed(batch)}
            uncond = (
                {"encoder_hidden_states": gen.embed([negative]).expand(size, -1, -1)} if use_cfg else None
            )

        # One CPU generator per video: its noise depends only on its own seed.
        rngs = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        with _timer(gen.device) as t_denoise:
            latents = sample(
                gen.denoise_fn,
                (size, *latent_shape),
                cond,
                uncond,
                scheduler=gen.scheduler,
                num_steps=steps,
                guidance_scale=guidance_scale,
                generator=rngs,
                dtype=gen.dtype,
                device=gen.device,
                progress=progress,
            )

        for j in range(size):
            index = start + j
            result = GenerationResult(
                index=index,
                prompt=batch[j],
                seed=seeds[j],
                batch_size=size,
                timings=Timings(text_encoding=t_text[0], denoising=t_denoise[0]),
            )
            if latents_only or return_latents:
                result.latents = latents[j].float().cpu().clone()
            if decode:
                # One video at a time bounds the VAE's activation memory at 4K.
                with _timer(gen.device) as t_decode:
                    video = decode_latents(gen.vae, latents[j : j + 1], tiled=gen.vae_tiling)
                    pixels = _to_uint8_frames(video[0])
                result.timings.decode = t_decode[0]
                if out is not None:
                    path = out / video_file_name(index, seeds[j])
                    with _timer(gen.device) as t_write:
                        write_video(path, pixels, fps)
                    result.timings.write = t_write[0]
                    result.video_path = path
                    logger.info("wrote %s (prompt %d, seed %d)", path, index, seeds[j])
                else:
                    result.frames = pixels
            results.append(result)
        if gen.sp_group is not None:
            # The peers wait here while rank 0 decodes and writes (they need no VAE memory meanwhile).
            dist.barrier(group=gen.sp_group)
        logger.info(
            "batch %d-%d: text %.2fs, denoise %.2fs%s",
            start, start + size - 1, t_text[0], t_denoise[0],
            f", decode {sum(r.timings.decode for r in results[-size:]):.2f}s" if decode else "",
        )  # fmt: skip
    return results

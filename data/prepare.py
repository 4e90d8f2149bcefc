"""Encode a folder of videos + captions into latent shards for training (see data/README.md).

Example::

    python data/prepare.py --videos clips/list.csv --vae models/Wan2.1-T2V-1.3B-Diffusers/vae \
        --text-encoder models/Wan2.1-T2V-1.3B-Diffusers --preset wan2.1-t2v-1.3b \
        --height 480 --width 832 --frames 81 --fps 16 --out shards/my_set

Resumable: rerun the same command after an interruption and finished shards are kept. All logic lives in
:func:`t3.data.prepare_shards`; this file only parses arguments and loads the models.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from t3.models.build import DTYPES

logger = logging.getLogger("prepare")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--videos",
        required=True,
        type=Path,
        help="video list: CSV (path,caption), JSON lines or a JSON array; paths relative to it",
    )
    parser.add_argument("--vae", required=True, type=Path, help="diffusers AutoencoderKLWan folder")
    parser.add_argument("--text-encoder", required=True, type=Path, help="umT5 encoder + tokenizer folder")
    parser.add_argument("--preset", required=True, help="model preset (t3.models.preset_names())")
    parser.add_argument("--height", required=True, type=int, help="clip height in pixels")
    parser.add_argument("--width", required=True, type=int, help="clip width in pixels")
    parser.add_argument("--frames", required=True, type=int, help="frames per clip, 4k + 1")
    parser.add_argument(
        "--fps", type=float, default=16.0, help="frame rate to sample at; 0 keeps the source's"
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder for the shards")
    parser.add_argument("--start", type=float, default=0.0, help="clip start time in seconds")
    parser.add_argument(
        "--max-upscale",
        type=float,
        default=1.0,
        help="largest allowed resize factor; smaller videos are skipped as too small",
    )
    parser.add_argument("--samples-per-shard", type=int, default=64, help="inputs per shard")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--vae-dtype", choices=DTYPES, default="float32", help="VAE compute dtype")
    parser.add_argument(
        "--text-dtype",
        choices=[*DTYPES, "auto"],
        default="auto",
        help="text encoder dtype; auto: bfloat16 on CUDA, float32 otherwise",
    )
    parser.add_argument(
        "--latent-dtype", choices=DTYPES, default="float32", help="dtype latents are stored in"
    )
    parser.add_argument(
        "--tiled", action=argparse.BooleanOptionalAction, default=True, help="tiled VAE encoding"
    )
    parser.add_argument("--tile-size", type=int, default=None, help="VAE tile size in pixels")
    parser.add_argument("--tile-stride", type=int, default=None, help="VAE tile stride in pixels")
    parser.add_argument("--text-batch-size", type=int, default=16, help="prompts per text encoder call")
    parser.add_argument("--embedding-cache", type=Path, default=None, help="on-disk prompt embedding cache")
    parser.add_argument("--decode-workers", type=int, default=2, help="threads decoding videos ahead")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the preparation; returns the exit status (2 for bad arguments or inputs)."""
    args = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from t3.data import (
        check_existing_settings,
        check_prepare_arguments,
        prepare_settings,
        prepare_shards,
        read_video_list,
    )
    from t3.models import PromptEmbeddingCache, get_spec, load_text_encoder, load_vae

    try:
        # Every argument is checked before any model is loaded (umT5-XXL alone takes minutes).
        spec = get_spec(args.preset)
        fps = args.fps or None  # 0: the source's rate
        clip = {
            "spec": spec,
            "height": args.height,
            "width": args.width,
            "frames": args.frames,
            "start": args.start,
            "max_upscale": args.max_upscale,
            "samples_per_shard": args.samples_per_shard,
        }
        tiles = {"tile_size": args.tile_size, "tile_stride": args.tile_stride}
        check_prepare_arguments(
            **clip,
            **tiles,
            fps=args.fps if args.fps < 0 else fps,
            decode_workers=args.decode_workers,
            name=lambda key: "--" + key.replace("_", "-"),
        )
        if args.text_batch_size < 1:
            raise ValueError(f"--text-batch-size={args.text_batch_size}: must be >= 1")
        for option, path in (("--vae", args.vae), ("--text-encoder", args.text_encoder)):
            if not path.exists():
                raise FileNotFoundError(f"{option}={path}: no such folder")
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise ValueError(f"--device={args.device}: not a device (e.g. cpu, cuda, cuda:1)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device={args.device}: no CUDA device here (use --device cpu)")
        entries = read_video_list(args.videos)
        # Settings that differ from existing shards in --out are refused now; the models' identities are
        # compared once they are loaded.
        check_existing_settings(
            args.out, prepare_settings(entries, **clip, fps=fps, latent_dtype=DTYPES[args.latent_dtype])
        )
        text_dtype = args.text_dtype
        if text_dtype == "auto":
            text_dtype = "bfloat16" if device.type == "cuda" else "float32"
        vae = load_vae(args.vae, dtype=DTYPES[args.vae_dtype]).to(device)
        encoder = load_text_encoder(args.text_encoder, dtype=DTYPES[text_dtype]).to(device)
        cache = PromptEmbeddingCache(
            encoder, args.embedding_cache, max_length=spec.text_len, batch_size=args.text_batch_size
        )
        result = prepare_shards(
            entries,
            args.out,
            vae=vae,
            text_cache=cache,
            **clip,
            **tiles,
            fps=fps,
            tiled=args.tiled,
            latent_dtype=DTYPES[args.latent_dtype],
            decode_workers=args.decode_workers,
            progress=not args.no_progress,
            info={
                "videos": str(args.videos),
                "vae_path": str(args.vae),
                "text_encoder_path": str(args.text_encoder),
                "vae_dtype": args.vae_dtype,
                "text_dtype": text_dtype,
            },
        )
    except (ValueError, FileNotFoundError) as err:
        logger.error("%s", err)
        return 2
    logger.info("done: %d samples in %s", result.samples, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

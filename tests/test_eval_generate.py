"""The eval generation stage: sharding, resumability after a kill, records, checkpoint hashing (tiny models, CPU).

The 5-prompt benchmark (``benchmark=tiny``: the first 5 4K-VBench prompts) is generated at 64x64 with 5
frames by the tiny DiT, VAE and text encoder, saved once per module and loaded through the public loaders.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from t3.eval import main, run
from t3.eval.generate_stage import checkpoint_sha256
from t3.eval.jobs import is_complete, video_jobs
from t3.eval.prompts import load_prompts
from t3.models.tiny import save_tiny_dit, save_tiny_text_encoder, save_tiny_vae
from t3.video_io import read_video, video_info, write_video

from .conftest import PROMPT_LISTS, REPO_ROOT

CONF_DIR = REPO_ROOT / "conf"
NUM_PROMPTS = 5
STEPS = 6  # enough work per video that the kill test can stop a task between two videos


def compose_eval(*overrides: str):
    """``conf/eval.yaml`` composed as ``eval.py`` would, with ``overrides``."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="eval", overrides=list(overrides))


def save_tiny_models(root: Path) -> Path:
    """The tiny DiT, VAE and text encoder in ``root/{dit,vae,text_encoder}``."""
    save_tiny_dit(root / "dit")
    save_tiny_vae(root / "vae")
    save_tiny_text_encoder(root / "text_encoder")
    return root


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> Path:
    return save_tiny_models(tmp_path_factory.mktemp("eval_tiny_models"))


def tiny_overrides(models: Path, out_dir: Path, *extra: str) -> list[str]:
    """A 5-prompt, 64x64x5, few-step run of the tiny model into ``out_dir``."""
    return [
        "model=tiny",
        "benchmark=tiny",
        f"benchmark.prompts={PROMPT_LISTS / '4k_vbench.json'}",
        f"model.dit_path={models / 'dit'}",
        f"model.vae_path={models / 'vae'}",
        f"model.text_encoder_path={models / 'text_encoder'}",
        f"out_dir={out_dir}",
        "generation.height=64",
        "generation.width=64",
        "generation.frames=5",
        f"generation.steps={STEPS}",
        "generation.fps=8",
        "wandb.enabled=false",
        *extra,
    ]


def output_files(out_dir: Path) -> list[str]:
    return sorted(p.name for p in out_dir.iterdir() if p.is_file() and not p.name.startswith(".sha256"))


def expected_files() -> list[str]:
    names = [f"video_{i:05d}_seed0" for i in range(NUM_PROMPTS)]
    return sorted([f"{n}.mp4" for n in names] + [f"{n}.json" for n in names])


# --- the kill-and-rerun test ------------------------------------------------------------------------------


@pytest.mark.slow
def test_killed_shard_and_leftovers_are_completed_on_rerun_without_duplicates(tiny_models, tmp_path):
    out = tmp_path / "run"
    entries = load_prompts(PROMPT_LISTS / "4k_vbench.json", limit=NUM_PROMPTS)
    jobs = video_jobs(entries, [0], out)

    # Shard 0 of 2 (prompts 0..2) runs as `python eval.py` and is killed once its first video is complete.
    cmd = [sys.executable, "eval.py", *tiny_overrides(tiny_models, out, "num_shards=2", "shard_index=0",
                                                       f"hydra.run.dir={tmp_path / 'hydra'}")]  # fmt: skip
    log = tmp_path / "eval_stderr.log"
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + 120
        try:
            while not jobs[0].record.exists():
                assert proc.poll() is None, f"eval.py exited early: {log.read_text()[-2000:]}"
                assert time.monotonic() < deadline, "no video within 120 s"
                time.sleep(0.02)
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    done_after_kill = [j.name for j in jobs[:3] if is_complete(j)]
    assert 1 <= len(done_after_kill) < 3, done_after_kill
    first_mtime = jobs[0].mp4.stat().st_mtime_ns

    # What a kill at other moments leaves: a half-written temporary mp4 of a shard-1 video, and an mp4 that
    # was renamed into place but has no record yet (here: truncated, so it would not even decode).
    (out / f".{jobs[4].mp4.name}.abc123.part").write_bytes(b"\x00" * 100)
    write_video(jobs[3].mp4, read_video(jobs[0].mp4)[:2], fps=8)
    jobs[2].mp4.write_bytes(jobs[0].mp4.read_bytes()[:300])

    for shard in (0, 1):
        run(compose_eval(*tiny_overrides(tiny_models, out, "num_shards=2", f"shard_index={shard}")))

    assert output_files(out) == expected_files()
    assert not list(out.glob(".*.part")) and not list(out.glob(".*.tmp"))
    assert jobs[0].mp4.stat().st_mtime_ns == first_mtime  # finished before the kill: not regenerated
    for job in jobs:
        assert is_complete(job)
        frames = read_video(job.mp4)
        assert frames.shape == (5, 64, 64, 3)
        record = json.loads(job.record.read_text())
        assert record["prompt"] == job.entry.prompt and record["index"] == job.entry.index
        assert record["frames"] == video_info(job.mp4).frames == 5


# --- in-process behaviour ---------------------------------------------------------------------------------


def test_generate_writes_records_and_skips_finished_videos(tiny_models, tmp_path):
    out = tmp_path / "run"
    cfg = compose_eval(*tiny_overrides(tiny_models, out, "benchmark.limit=2", "generation.seeds=[0,7]"))
    summary = run(cfg)
    assert summary.generated == [
        "video_00000_seed0.mp4", "video_00000_seed7.mp4", "video_00001_seed0.mp4", "video_00001_seed7.mp4"
    ]  # fmt: skip
    record = json.loads((out / "video_00001_seed7.json").read_text())
    assert record["seed"] == 7 and record["steps"] == STEPS and record["model"] == "tiny"
    assert (record["height"], record["width"], record["frames"], record["fps"]) == (64, 64, 5, 8)
    assert record["content_fps"] == 16 and record["sampler"] == "diffsynth_euler"  # tiny: 16 fps, like Wan2.1
    assert record["schedule"] == cfg.t3.name and record["negative_prompt"].startswith("色调艳丽")
    assert record["checkpoint_sha256"] == checkpoint_sha256(tiny_models / "dit")
    assert set(record["timings_s"]) == {"text_encoding", "denoising", "decode", "write", "total"}
    assert record["device"].startswith("CPU") and record["dtype"] == "float32"

    again = run(cfg)
    assert again.generated == [] and len(again.skipped) == 4


def test_videos_of_other_settings_are_an_error_not_a_mix(tiny_models, tmp_path):
    out = tmp_path / "run"
    run(compose_eval(*tiny_overrides(tiny_models, out, "benchmark.limit=1")))
    with pytest.raises(ValueError, match=r"video_00000_seed0.json: steps is 6 but this run has 4"):
        run(compose_eval(*tiny_overrides(tiny_models, out, "benchmark.limit=1", "generation.steps=4")))


def test_ckpt_overrides_model_dit_path(tiny_models, tmp_path):
    other = save_tiny_dit(tmp_path / "other_dit", format="wan", seed=1)  # a single Wan-format file
    out = tmp_path / "run"
    run(compose_eval(*tiny_overrides(tiny_models, out, "benchmark.limit=1", f"ckpt={other}")))
    record = json.loads((out / "video_00000_seed0.json").read_text())
    assert record["checkpoint"] == str(other)
    assert record["checkpoint_sha256"] == checkpoint_sha256(other) != checkpoint_sha256(tiny_models / "dit")


def test_checkpoint_hash_is_cached_by_path_size_and_mtime(tmp_path):
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"weights")
    cache = tmp_path / "cache.json"
    first = checkpoint_sha256(ckpt, cache)
    assert first == hashlib.sha256(b"weights").hexdigest()  # a single file: its own sha256
    assert len(json.loads(cache.read_text())) == 1
    # A changed cache entry is trusted while size and mtime are unchanged: the file is not read again.
    key = next(iter(json.loads(cache.read_text())))
    cache.write_text(json.dumps({key: "f" * 64}))
    assert checkpoint_sha256(ckpt, cache) == "f" * 64
    ckpt.write_bytes(b"new weights")  # new size: hashed again
    assert checkpoint_sha256(ckpt, cache) not in (first, "f" * 64)


def test_bad_config_values_fail_before_any_model_is_loaded(tmp_path):
    base = ["model=tiny", "benchmark=tiny", f"benchmark.prompts={PROMPT_LISTS / '4k_vbench.json'}",
            f"out_dir={tmp_path}", "generation.height=64", "generation.width=64", "generation.frames=5"]  # fmt: skip
    with pytest.raises(ValueError, match=r"frames 6 is not of the form 4k\+1"):
        run(compose_eval(*base, "generation.frames=6"))
    wan = [o for o in base if o != "model=tiny"]
    with pytest.raises(
        ValueError, match=r"ckpt / model.dit_path is required .* only model=tiny builds random"
    ):
        run(compose_eval(*wan, "model=wan2.1-t2v-1.3b", "model.dit_path=null"))
    with pytest.raises(FileNotFoundError, match=r"model.vae_path='/nonexistent': no such file"):
        run(compose_eval(*base, f"model.dit_path={tmp_path}", "model.vae_path=/nonexistent",
                         f"model.text_encoder_path={tmp_path}"))  # fmt: skip
    with pytest.raises(
        ValueError, match=r"model.attention_tokens_per_call must be a positive integer or null, got 0"
    ):
        run(compose_eval(*base, "model.attention_tokens_per_call=0"))
    with pytest.raises(ValueError, match=r"generation.colour: unknown key"):
        run(compose_eval(*base, "+generation.colour=1"))
    with pytest.raises(FileNotFoundError, match=r"benchmark.prompts='missing.json': no such file"):
        run(compose_eval(*base, "benchmark.prompts=missing.json"))
    with pytest.raises(ValueError, match=r"stage='train': expected one of"):
        run(compose_eval(*base, "stage=train"))


@pytest.mark.parametrize(
    "override,words",
    [
        ("generation.guidance_scale=abc", "generation.guidance_scale='abc': must be a number"),
        ("generation.steps=2.5", "generation.steps=2.5: must be an integer"),
        ("generation.vae_tiling=maybe", "generation.vae_tiling='maybe': must be true or false"),
        ("generation.seeds=[0,a]", "generation.seeds=[0, 'a']: must be a list of integers"),
        ("generation.negative_prompt=[a]", "generation.negative_prompt=['a']: must be a string or null"),
        ("speed.repeats=often", "speed.repeats='often': must be an integer"),
    ],
)
def test_settings_are_type_checked_before_any_model_is_loaded(tmp_path, override, words):
    # Model paths that do not exist: a type error must be reported before they are even looked at.
    base = ["model=tiny", "benchmark=tiny", f"benchmark.prompts={PROMPT_LISTS / '4k_vbench.json'}",
            f"out_dir={tmp_path}", "generation.height=64", "generation.width=64", "generation.frames=5",
            "model.dit_path=/nonexistent", "model.vae_path=/nonexistent", "model.text_encoder_path=/nonexistent"]  # fmt: skip
    stage = "stage=speed" if override.startswith("speed.") else "stage=generate"
    with pytest.raises(ValueError) as info:
        run(compose_eval(*base, stage, override))
    assert str(info.value) == words or words in str(info.value), str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "world,overrides,words",
    [
        (2, ["parallel.sequence_parallel_size=3"], "parallel.sequence_parallel_size=3 does not divide the world size 2"),
        # 5 frames are 2 latent frames: 4 ranks cannot each hold whole frames
        (4, ["parallel.sequence_parallel_size=4", "parallel.align=frames"],
         "parallel.sequence_parallel_size=4 cannot cut 2 latent frames on frame boundaries"),
        (1, ["parallel.sequence_parallel_size=two"], "parallel.sequence_parallel_size='two': must be an integer"),
        (1, ["parallel.align=diagonal"], "parallel.align='diagonal': must be one of ['tokens', 'frames']"),
        (1, ["+parallel.pipeline=2"], "parallel.pipeline: unknown key"),
        (1, ["stage=speed", "parallel.sequence_parallel_size=2"],
         "parallel.sequence_parallel_size=2: stage=speed measures one process on one device"),
        (2, ["stage=score"], "stage=score runs in one process, not under torchrun (WORLD_SIZE=2)"),
        (2, ["generation.device=cuda:1"], "generation.device='cuda:1': names one GPU for all 2 processes"),
    ],
)  # fmt: skip
def test_bad_parallel_settings_fail_before_any_process_group_or_model(
    tmp_path, monkeypatch, world, overrides, words
):
    import torch.distributed as dist

    import t3.eval.generate_stage

    def must_not_run(*args, **kwargs):
        raise AssertionError("a process group or a model was made for a run with bad parallel settings")

    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setattr(dist, "init_process_group", must_not_run)
    monkeypatch.setattr(t3.eval.generate_stage, "_load_generator", must_not_run)
    base = ["model=tiny", "benchmark=tiny", f"benchmark.prompts={PROMPT_LISTS / '4k_vbench.json'}",
            f"out_dir={tmp_path}", "generation.height=64", "generation.width=64", "generation.frames=5",
            "model.dit_path=/nonexistent", "model.vae_path=/nonexistent", "model.text_encoder_path=/nonexistent"]  # fmt: skip
    dry_runs = [[], ["dry_run=true"]] if not any(o.startswith("stage=") for o in overrides) else [[]]
    for dry_run in dry_runs:
        with pytest.raises(ValueError) as info:
            run(compose_eval(*base, *overrides, *dry_run))
        assert words in str(info.value) and "\n" not in str(info.value), str(info.value)
    assert not list(tmp_path.iterdir())


def test_eval_errors_are_one_line_without_a_traceback(tmp_path, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    base = ["model=tiny", "benchmark=tiny", f"out_dir={tmp_path}", "generation.height=64", "generation.width=64",
            "generation.frames=5"]  # fmt: skip
    cases = [
        (["benchmark.prompts=missing.json"], "FileNotFoundError: benchmark.prompts='missing.json': no such file"),
        (["model.preset=wan2.1-t2v-1.3b", "model.dit_path=null"], "ValueError: ckpt / model.dit_path is required"),
        ([f"model.dit_path={tmp_path}", "model.vae_path=/nonexistent", f"model.text_encoder_path={tmp_path}"],
         "model.vae_path='/nonexistent': no such file"),
        (["stage=speed", "speed.out_dir=${oc.env:T3_NOT_SET}"], "T3_NOT_SET"),
    ]  # fmt: skip
    for overrides, words in cases:
        with pytest.raises(SystemExit) as info:
            main(compose_eval(*base, *overrides))
        message = str(info.value.code)
        assert message.startswith("eval error: ") and "\n" not in message and words in message, message
    # The command line: one line on stderr, exit status 1, no Hydra traceback.
    cmd = [sys.executable, str(REPO_ROOT / "eval.py"), "benchmark.prompts=missing.json",
           f"hydra.run.dir={tmp_path / 'hydra'}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "HYDRA_FULL_ERROR" not in proc.stderr, proc.stderr[-2000:]
    assert [line for line in proc.stderr.splitlines() if "error" in line] == [
        f"eval error: FileNotFoundError: benchmark.prompts='missing.json': no such file (relative to {tmp_path})"
    ]


def test_generation_refuses_before_loading_what_cannot_fit(tiny_models, tmp_path, monkeypatch):
    import t3.eval.generate_stage
    import t3.memory
    from t3.memory import DoesNotFitError

    def must_not_load(*args, **kwargs):
        raise AssertionError("models were loaded for a run that cannot fit")

    monkeypatch.setattr(t3.eval.generate_stage, "_load_generator", must_not_load)
    # Beyond the tiny DiT's RoPE table (32 positions per axis): refused by the cheap checks too (dry run).
    for extra in ((), ("dry_run=true",)):
        with pytest.raises(ValueError, match="covers at most 32 positions per axis"):
            run(compose_eval(*tiny_overrides(tiny_models, tmp_path, "generation.width=1024", *extra)))
    monkeypatch.setattr(t3.memory, "available_memory", lambda device: (1000, "available host memory"))
    with pytest.raises(DoesNotFitError, match=r"^generation: one DiT forward of tiny at 64x64x5 .* batch 2"):
        run(compose_eval(*tiny_overrides(tiny_models, tmp_path)))
    assert not list(tmp_path.glob("*.mp4"))


def test_eval_cli_generates_with_the_tiny_random_model_and_nothing_on_disk(tmp_path):
    """`model=tiny` with its null paths: the tiny random DiT, VAE and text encoder, built in memory, seeded."""
    cmd = [
        sys.executable, "eval.py", "model=tiny", "benchmark=tiny", "benchmark.limit=2",
        "generation.height=64", "generation.width=64",
        "generation.frames=5", "generation.steps=2", "generation.device=cpu", f"out_dir={tmp_path / 'out'}",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = [f"video_{i:05d}_seed0" for i in range(2)]
    assert output_files(tmp_path / "out") == sorted(
        [f"{n}.mp4" for n in names] + [f"{n}.json" for n in names]
    )
    record = json.loads((tmp_path / "out" / f"{names[0]}.json").read_text())
    assert record["checkpoint"] == record["checkpoint_sha256"] == "tiny random DiT (seed 0)"
    assert video_info(tmp_path / "out" / f"{names[0]}.mp4").frames == 5


def test_inference_memory_counts_each_gpus_share_of_the_tokens_under_sequence_parallelism(monkeypatch):
    """A 4K video that one GPU's memory refuses fits when 8 GPUs share its tokens; the refusal names SP."""
    import torch

    import t3.memory
    from t3.memory import GIB, DoesNotFitError, check_inference_memory, inference_memory
    from t3.models import get_spec

    spec = get_spec("wan2.1-t2v-1.3b")
    grid = spec.video_token_grid(81, 2176, 3840)
    one = inference_memory(spec, grid, batch=2, dtype=torch.bfloat16)
    eight = inference_memory(spec, grid, batch=2, dtype=torch.bfloat16, sequence_parallel=8)
    rope = 2 * 685_440 * 128 * 8  # the RoPE tables are built whole on every rank
    assert eight.weights == one.weights
    assert eight.activations - rope == pytest.approx((one.activations - rope) / 8)
    budget = (one.weights + eight.activations + one.activations) / 2  # between the two needs
    monkeypatch.setattr(t3.memory, "available_memory", lambda device: (budget, "free on the GPU"))
    size, kwargs = (2176, 3840, 81), dict(batch=2, dtype=torch.bfloat16, device="cpu", what="generation")
    with pytest.raises(DoesNotFitError, match=r"685,440 tokens, batch 2"):
        check_inference_memory(spec, size, **kwargs)
    assert check_inference_memory(spec, size, sequence_parallel=8, **kwargs) == eight
    monkeypatch.setattr(t3.memory, "available_memory", lambda device: (GIB, "free on the GPU"))
    with pytest.raises(
        DoesNotFitError, match=r"685,440 tokens over 8 GPUs \(parallel.sequence_parallel_size\)"
    ):
        check_inference_memory(spec, size, sequence_parallel=8, **kwargs)

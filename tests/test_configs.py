"""Every experiment composes and builds on the meta device; impossible configs fail in one line."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from t3.config import ConfigError, register_configs, validate

from .conftest import REPO_ROOT

EXPERIMENTS = sorted(p.stem for p in (REPO_ROOT / "conf" / "experiment").glob("*.yaml"))


def _plain_default(overrides: tuple[str, ...]) -> list[str]:
    """Without an ``experiment=`` override, drop the default ``demo`` experiment (``python train.py``)."""
    has_experiment = any(o.lstrip("+~").startswith("experiment") for o in overrides)
    return list(overrides) if has_experiment else ["~experiment", *overrides]


def compose_train(*overrides: str, root: Path | str = "/nonexistent/t3-test-root"):
    """``conf/train.yaml`` composed with ``overrides`` (as ``python train.py <overrides>`` would)."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=[f"paths.root_dir={root}", *_plain_default(overrides)])


def test_experiments_exist():
    assert {"t3_720p", "t3_4k", "t3_4k_lora", "t3_720p_wan22", "t3_4k_wan22", "t3_4k_lora_wan22"} <= set(
        EXPERIMENTS
    )


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_builds_on_meta(name):
    from t3.training.dry_run import build_dry_run

    cfg = compose_train(f"experiment={name}", "dry_run=true")
    facts = validate(cfg)
    run = build_dry_run(cfg, facts)
    params = list(run.dit.parameters())
    assert params and all(p.device == torch.device("meta") for p in params)
    assert run.num_trainable == sum(p.numel() for p in params if p.requires_grad) > 0
    assert len(run.dit.blocks) == facts.num_layers
    assert run.macs_t3.total <= run.macs_dense.total
    assert cfg.batch.global_size == facts.accumulate * cfg.batch.micro_size * facts.data_parallel_size
    assert run.optimizer.param_groups[0]["lr"] == cfg.optim.lr


PAPER = {
    # name: (preset, schedule, (h, w, frames), grid, max_steps, trainable)
    "t3_720p": ("wan2.1-t2v-1.3b", "wan21_720p", (720, 1280, 81), (21, 45, 80), 5000, "all"),
    "t3_4k": ("wan2.1-t2v-1.3b", "wan21_4k", (2176, 3840, 81), (21, 136, 240), 500, "all"),
    "t3_4k_lora": ("wan2.1-t2v-1.3b", "wan21_4k", (2176, 3840, 81), (21, 136, 240), 500, "lora"),
    "t3_720p_wan22": ("wan2.2-ti2v-5b", "wan22_720p", (704, 1280, 81), (21, 22, 40), 5000, "all"),
    "t3_4k_wan22": ("wan2.2-ti2v-5b", "wan22_4k", (2176, 3840, 81), (21, 68, 120), 500, "all"),
    "t3_4k_lora_wan22": ("wan2.2-ti2v-5b", "wan22_4k", (2176, 3840, 81), (21, 68, 120), 500, "lora"),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_experiments_follow_the_paper_recipe(name):
    preset, schedule, size, grid, steps, trainable = PAPER[name]
    cfg = compose_train(f"experiment={name}", "dry_run=true")
    facts = validate(cfg, world_size=8)
    assert cfg.experiment_name == name and facts.preset == preset
    assert facts.schedule.name == schedule and facts.grid == grid
    assert (cfg.data.height, cfg.data.width, cfg.data.num_frames) == size
    assert cfg.trainer.max_steps == steps and cfg.finetune.trainable == trainable
    assert cfg.batch.global_size == 64 and facts.accumulate == 8
    # The authors' objective (DiffSynth-Studio's training table and bell weight), shift 5.
    assert cfg.objective.flow_shift == 5.0 and cfg.objective.timestep_sampler == "shifted_discrete"
    assert cfg.objective.loss_weighting == "bell"
    assert cfg.trainer.gradient_clip_val == 1.0 and cfg.optim.weight_decay == 1e-2
    assert cfg.trainer.precision == "bf16-mixed"
    if trainable == "lora":
        assert cfg.finetune.lora.rank == 64
    else:
        assert cfg.optim.lr == 2e-5
    stage1 = name.replace("4k_lora", "720p").replace("4k", "720p")
    if "4k" in name:  # stage 2 starts from the stage-1 export
        assert cfg.model.init_from == f"{cfg.paths.output_dir}/{stage1}/export/diffusers"
    assert cfg.run_dir == f"{cfg.paths.output_dir}/{name}"


def test_default_config_is_a_cpu_smoke_run():
    cfg = compose_train()
    facts = validate(cfg)
    assert cfg.model.preset == "tiny" and cfg.trainer.accelerator == "cpu" and facts.world_size == 1


def test_entry_names_the_function_train_py_runs():
    """Training unless the experiment names another (the demo); a function the module lacks is one line."""
    from t3.config import TRAIN_ENTRY, entry_function
    from t3.training.train import main as train_main

    assert compose_train().entry == TRAIN_ENTRY and entry_function(TRAIN_ENTRY) is train_main
    assert all(
        compose_train(f"experiment={name}", "dry_run=true").entry == TRAIN_ENTRY
        for name in EXPERIMENTS
        if name != "demo"
    )
    with pytest.raises(
        ConfigError, match=r"^entry='t3.training.train:mian': t3.training.train has no function"
    ):
        entry_function("t3.training.train:mian")


BAD = [
    # overrides, key the message must name, words it must contain
    (["data.num_frames=80"], "data.num_frames 80", "4k+1 for tiny; nearest valid: 77 or 81"),
    (["data.height=72"], "data.height 72", "multiple of 16 for tiny; nearest valid: 64 or 80"),
    (["experiment=t3_720p_wan22", "dry_run=true", "data.height=720"], "data.height 720", "multiple of 32"),
    (["t3=wan21_4k"], "t3='wan21_4k'", "does not fit"),
    (["data.width=1024"], "data.width 1024", "covers at most 32 positions per axis"),
    (["finetune.trainable=lora", "finetune.lora.rank=0"], "finetune.lora.rank=0", "1 <= rank"),
    (["finetune.trainable=everything"], "finetune.trainable='everything'", "one of"),
    (["batch.global_size=6", "batch.micro_size=4"], "batch.global_size=6", "multiple of"),
    (["optim.lr=0"], "optim.lr=0", "0 < lr"),
    (["strategy=deepspeed_zero3", "ema.enabled=true"], "ema.enabled=True", "ZeRO-1/2"),
    (["strategy=deepspeed_zero2", "strategy.zero_stage=4"], "strategy.zero_stage=4", "<= 3"),
    (["trainer=gpu", "trainer.accelerator=cpu"], "trainer.precision='bf16-mixed'", "32-true"),
    (["experiment=t3_720p", "data.train.urls_or_dir=/data"], "model.dit_path", "required"),
    (["experiment=t3_720p", "model.dit_path=/x"], "data.train.urls_or_dir", "required"),
    (["experiment=t3_4k", "data.train.urls_or_dir=/data"], "model.init_from=", "stage-1"),
    (["+data.train.num_sample=3"], "data.train.num_sample", "unknown argument"),
    (["validation.sigmas=[0.5,1.5]"], "validation.sigmas", "[0, 1]"),
    (["objective.loss_weighting=snr"], "objective.loss_weighting='snr'", "one of"),
    # The function train.py runs: checked without importing it.
    (["entry=t3.training.train"], "entry='t3.training.train'", "package.module:function"),
    (["entry=t3.trainingg.train:main"], "entry='t3.trainingg.train:main'", "no module"),
    # Keys added with "+" (Hydra's own hint after an unknown-key error) to a schema group are refused.
    (["+optim.lrr=1e-4"], "optim.lrr", "unknown key"),
    (["+finetune.lora.ranks=8"], "finetune.lora.ranks", "unknown key"),
    (["+max_steps=10"], "max_steps", "unknown key"),
    # A DiT path that does not exist fails here, even where random_init would apply without one.
    (["model=tiny", "model.dit_path=/nonexistent/dit"], "model.dit_path='/nonexistent/dit'", "no such file"),
    (
        ["model.attention_tokens_per_call=0"],
        "model.attention_tokens_per_call=0",
        "1 <= attention_tokens_per_call",
    ),
]


@pytest.mark.parametrize("overrides,key,words", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_config_fails_in_one_line_naming_the_key(overrides, key, words):
    cfg = compose_train(*overrides)
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    message = str(info.value)
    assert "\n" not in message and key in message and words in message, message


def test_gpu_run_on_a_machine_without_a_gpu_fails_in_validation(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError) as info:
        validate(compose_train("trainer=gpu"))
    message = str(info.value)
    assert "\n" not in message and "trainer.accelerator='gpu'" in message and "trainer=cpu" in message, (
        message
    )
    validate(compose_train("experiment=t3_720p", "dry_run=true"))  # planning a GPU run needs no GPU


def test_a_failed_start_creates_no_logger(tmp_path, monkeypatch):
    """Loggers (a wandb run, CSV folders) exist only once every check has passed: here the launcher's
    process count disagrees with the config, found once the Trainer is built."""
    import dataclasses
    import importlib

    train_module = importlib.import_module("t3.training.train")  # the package's `train` is the function

    def validate_for_two(cfg, **kwargs):
        return dataclasses.replace(validate(cfg, **kwargs), world_size=2)

    monkeypatch.setattr(train_module, "validate", validate_for_two)
    cfg = compose_train(
        "logger.wandb=true", "logger.mode=offline", f"run_dir={tmp_path / 'run'}", root=tmp_path
    )
    with pytest.raises(ConfigError, match=r"the launcher started 1 processes but the config implies 2"):
        train_module._train(cfg)
    run_dir = tmp_path / "run"
    assert not (run_dir / "wandb_id.txt").exists() and not (run_dir / "wandb").exists()
    assert not (run_dir / "csv").exists()


def test_global_batch_must_split_over_the_world_size():
    cfg = compose_train("batch.global_size=6", "batch.micro_size=1", "strategy=ddp")
    assert validate(cfg, world_size=3).accumulate == 2
    with pytest.raises(ConfigError, match=r"batch.global_size=6: must be a multiple of .* = 1 x 4 = 4"):
        validate(cfg, world_size=4)


def test_sequence_parallel_groups_share_samples_so_only_replicas_split_the_batch():
    cfg = compose_train(
        "~experiment", "batch.global_size=4", "strategy=ddp", "parallel.sequence_parallel_size=2"
    )
    facts = validate(cfg, world_size=4)
    assert (facts.sequence_parallel_size, facts.data_parallel_size, facts.accumulate) == (2, 2, 2)
    assert validate(cfg, world_size=2).accumulate == 4


@pytest.mark.parametrize(
    "overrides,world,words",
    [
        (["parallel.sequence_parallel_size=3"], 4, "parallel.sequence_parallel_size=3 does not divide the world size 4 (accepted: a divisor of 4: 1, 2, 4)"),
        (["parallel.sequence_parallel_size=0"], 4, "parallel.sequence_parallel_size=0"),
        (["parallel.sequence_parallel_size=4", "parallel.align=frames", "data.num_frames=5"], 4, "cannot cut 2 latent frames on frame boundaries"),
        (["parallel.align=rows"], 1, "parallel.align='rows': must be one of"),
        (["parallel.policy=fastest"], 1, "parallel.policy='fastest': must be one of"),
        (["parallel.sequence_parallel_size=2", "batch.global_size=3"], 4, "batch.global_size=3: must be a multiple of batch.micro_size x data-parallel size (world 4 / parallel.sequence_parallel_size 2) = 1 x 2 = 2"),
    ],
)  # fmt: skip
def test_bad_sequence_parallel_settings_fail_in_one_line_before_any_model(overrides, world, words):
    cfg = compose_train("~experiment", "strategy=ddp", *overrides)
    with pytest.raises(ConfigError) as error:
        validate(cfg, world_size=world)
    assert words in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    "override,words",
    [("data.heigth=720", "heigth"), ("data.height=tall", "data.height"), ("finetune.lora.rank=1.5", "rank")],
)
def test_typos_and_wrong_types_fail_at_composition(override, words):
    with pytest.raises(ConfigCompositionException) as info:
        compose_train(override)
    assert words in str(info.value) + str(info.value.__cause__)


def test_cli_config_error_is_one_line_before_any_model(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "train.py"), "data.num_frames=80", f"paths.root_dir={tmp_path}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "config error" in line]
    assert errors == [
        "config error: data.num_frames 80 is not of the form 4k+1 for tiny; nearest valid: 77 or 81"
    ], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "outputs" / "default" / "checkpoints").exists()


@pytest.mark.parametrize("script", ["train.py", "eval.py"])
def test_help_starts_with_usage_and_main_options(script, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / script), "--help"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0] and "powered by Hydra" not in lines[0]  # the script's own first line, not a banner
    assert any(line.strip().startswith(f"python {script}") for line in lines[:12])  # usage lines come first
    assert "Main options" in proc.stdout and "Config groups" in proc.stdout and "--cfg job" in proc.stdout
    assert any(line.split()[:2] == ["model", "tiny,"] for line in lines)  # a group with its options
    assert "Powered by Hydra" not in proc.stdout and len(lines) < 80  # not the whole composed config


def test_dry_run_cli_t3_4k_needs_no_weights(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "train.py"),
            "experiment=t3_4k",
            "dry_run=true",
            f"paths.root_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    for words in (
        "token grid (21, 136, 240)",
        "tokens per sample: 685,440",
        "layer   1: plan (1,17,30)",
        "self-attention: 4.330e+16 -> 5.945e+14 (72.8x less)",
        "memory per GPU (DeepSpeed ZeRO-3, 8 GPUs, bf16-mixed)",
        "tokens/s",
    ):
        assert words in out, words


@pytest.mark.parametrize("trainable", ["attention", "lora"])
def test_training_and_the_dry_run_prepare_the_same_dit(trainable):
    """One function swaps T3 in and selects the trainable weights (LoRA settings included) for both."""
    from t3.training.dry_run import build_dry_run
    from t3.training.module import T3FinetuneModule
    from t3.transform import schedule_of

    lora = ["finetune.lora.rank=3", "finetune.lora.alpha=6", "finetune.lora.target_modules=[to_q,ffn.net.2]"]
    cfg = compose_train(f"finetune.trainable={trainable}", *lora)
    facts = validate(cfg)
    dry = build_dry_run(cfg, facts)
    module = T3FinetuneModule(
        model=OmegaConf.to_object(cfg.model), schedule=facts.schedule, finetune=OmegaConf.to_object(cfg.finetune),
        optim=OmegaConf.to_object(cfg.optim), objective=OmegaConf.to_object(cfg.objective),
        validation=OmegaConf.to_object(cfg.validation), max_steps=1, seed=0,
    )  # fmt: skip
    module.configure_model()
    trained = {n for n, p in module.dit.named_parameters() if p.requires_grad}
    assert trained == {n for n, p in dry.dit.named_parameters() if p.requires_grad}
    assert (module.trainable_summary.trainable, module.trainable_summary.total) == (
        dry.num_trainable,
        dry.num_params,
    )
    assert schedule_of(module.dit) is schedule_of(dry.dit) is facts.schedule


def test_dry_run_metrics_and_memory_formulas():
    from t3.config import StrategyConfig
    from t3.memory import state_memory
    from t3.training import train

    cfg = compose_train("experiment=t3_4k_lora", "dry_run=true", "dry_run_num_gpus=4")
    metrics, objects = train(cfg)
    run = objects["dry_run"]
    assert metrics["dry_run/tokens_per_sample"] == 21 * 136 * 240
    assert metrics["dry_run/attention_macs_dense"] / metrics["dry_run/attention_macs_t3"] == pytest.approx(
        72.8, abs=0.05
    )
    # LoRA r=64 on q,k,v,o of both attentions and the two FFN linears of 30 blocks: r * (in + out) each.
    d, f = 1536, 8960
    expected = 30 * 64 * (8 * (d + d) + (d + f) + (f + d))
    assert run.num_trainable == expected
    # ZeRO-2, bf16: 2P replicated, (2T + 12T) / N.
    p, t = run.num_params, run.num_trainable
    assert metrics["dry_run/params_gib_per_gpu"] * 2**30 == pytest.approx(2 * p)
    assert metrics["dry_run/grads_gib_per_gpu"] * 2**30 == pytest.approx(2 * t / 4)
    assert metrics["dry_run/optimizer_gib_per_gpu"] * 2**30 == pytest.approx(12 * t / 4)
    full = StrategyConfig(name="deepspeed", zero_stage=3, offload_optimizer=True, offload_parameters=True)
    assert state_memory(num_params=8, num_trainable=8, strategy=full, world_size=2, bf16=True) == (
        0,
        8,
        0,
        56,
    )
    ddp = StrategyConfig(name="ddp")
    assert state_memory(num_params=10, num_trainable=4, strategy=ddp, world_size=8, bf16=True) == (
        40,
        16,
        32,
        0,
    )
    assert (
        math.isfinite(metrics["dry_run/tokens_per_s_t3"])
        and metrics["dry_run/tokens_per_s_t3"] > metrics["dry_run/tokens_per_s_dense"]
    )


def test_composed_config_keeps_schema_types():
    cfg = compose_train("experiment=t3_4k", "dry_run=true")
    assert OmegaConf.get_type(cfg.model).__name__ == "ModelConfig"
    assert OmegaConf.get_type(cfg.finetune.lora).__name__ == "LoraConfig"


SHARDS_32 = ["data=latent_shards", "data.height=32", "data.width=32", "data.num_frames=17"]


def test_data_paths_are_checked_one_line_each(tmp_path):
    from t3.data import write_shards

    sample = {
        "__key__": "000000",
        "latents": torch.zeros(4, 5, 4, 4),
        "text": torch.zeros(3, 16),
        "caption": "a red circle",
    }
    write_shards([sample], tmp_path / "shards")
    (tmp_path / "empty").mkdir()
    good = f"data.train.urls_or_dir={tmp_path / 'shards'}"
    assert validate(compose_train(*SHARDS_32, good)).latent_shape == (4, 5, 4, 4)
    cases = [
        ([f"data.train.urls_or_dir={tmp_path / 'missing'}"], "data.train.urls_or_dir=", "no such file"),
        ([f"data.train.urls_or_dir={tmp_path / 'empty'}"], "data.train.urls_or_dir=", "no .tar shards"),
        ([f"data.train.urls_or_dir='{tmp_path / 'shards' / 'shard-{000000..000002}.tar'}'"], "data.train", "2 of 3"),
        ([good, f"data.val.urls_or_dir={tmp_path / 'held_out'}"], "data.val.urls_or_dir=", "no such file"),
        (
            ["data=raw_videos", "data.height=32", "data.width=32", "data.num_frames=17",
             f"data.prepare.video_list={tmp_path / 'list.csv'}"],
            "data.prepare.video_list=",
            "no such file",
        ),
    ]  # fmt: skip
    for overrides, key, words in cases:
        with pytest.raises(ConfigError) as info:
            validate(compose_train(*SHARDS_32, *overrides))
        message = str(info.value)
        assert "\n" not in message and key in message and words in message, message


def test_shards_of_another_size_than_configured_are_refused(tmp_path):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "shard-000000.tar").write_bytes(b"")
    (tmp_path / "shards" / "manifest.json").write_text('{"latent_shape": [4, 5, 8, 8]}')
    cfg = compose_train(*SHARDS_32, f"data.train.urls_or_dir={tmp_path / 'shards'}")
    with pytest.raises(ConfigError, match=r"data.train.urls_or_dir=.*\[4, 5, 8, 8\].*data.train.sizes"):
        validate(cfg)
    # Listing the shards' size as a bucket accepts them.
    validate(
        compose_train(
            *SHARDS_32,
            f"data.train.urls_or_dir={tmp_path / 'shards'}",
            "data.train.sizes=[[17,32,32],[17,64,64]]",
        )
    )


def zero3_total(run, world_size: int) -> float:
    """Bytes per GPU of a bf16 dry run under ZeRO-3 on ``world_size`` GPUs: its state and activations."""
    from t3.config import StrategyConfig
    from t3.memory import state_memory

    state = state_memory(
        num_params=run.num_params,
        num_trainable=run.num_trainable,
        strategy=StrategyConfig(name="deepspeed", zero_stage=3),
        world_size=world_size,
        bf16=True,
    )
    return sum(state) + run.memory.activations


def test_dry_run_answers_does_it_fit_and_on_how_many_gpus(caplog):
    from t3.memory import GIB
    from t3.training import train
    from t3.training.dry_run import format_dry_run

    cfg = compose_train("experiment=t3_4k", "dry_run=true", "dry_run_num_gpus=8")
    metrics, objects = train(cfg)
    run = objects["dry_run"]
    m = run.memory
    assert metrics["dry_run/fits"] == 1.0
    assert metrics["dry_run/gpu_margin_gib"] == pytest.approx(80 - m.gpu_total / GIB)
    # ZeRO-3 shards the state over the GPUs; activations stay: the fewest GPUs whose total fits 80 GiB.
    fewest = next(n for n in (1, 2, 4, 8, 16, 32, 64) if zero3_total(run, n) <= 80 * GIB)
    assert metrics["dry_run/fewest_gpus"] == fewest
    # Activation offload pins the block inputs of every GPU of a node in host memory.
    assert m.activations_cpu > 0
    assert metrics["dry_run/pinned_host_gib_per_node"] == pytest.approx(8 * m.activations_cpu / GIB)
    text = format_dry_run(cfg, run)
    assert (
        f"verdict: fits in 80 GiB per GPU (dry_run_gpu_memory_gib) with {80 - m.gpu_total / GIB:.2f} GiB"
        in text
    )
    assert f"fewest GPUs that fit: {fewest} " in text
    assert (
        f"host memory per node (8 GPUs): {8 * m.activations_cpu / GIB:.2f} GiB pinned for activation offload"
        in text
    )
    assert "do not shrink with more data-parallel GPUs" in text

    small = compose_train("experiment=t3_4k", "dry_run=true", "dry_run_gpu_memory_gib=40")
    metrics, objects = train(small)
    text = format_dry_run(small, objects["dry_run"])
    assert metrics["dry_run/fits"] == 0.0 and math.isnan(metrics["dry_run/fewest_gpus"])
    assert (
        f"does NOT fit in 40 GiB per GPU (dry_run_gpu_memory_gib): {m.gpu_total / GIB - 40:.2f} GiB over"
        in text
    )
    assert "no GPU count fits at parallel.sequence_parallel_size=1: activations alone are" in text


def test_dry_run_counts_the_cheaper_backward_of_frozen_weights():
    """LoRA and attention-only runs skip the weight gradients of frozen layers: fewer FLOPs per step."""
    from t3.training import train
    from t3.training.dry_run import training_macs_per_sample

    speeds = {}
    for trainable in ("all", "attention", "lora"):
        cfg = compose_train("experiment=t3_4k_lora", "dry_run=true", f"finetune.trainable={trainable}")
        metrics, objects = train(cfg)
        speeds[trainable] = metrics["dry_run/tokens_per_s_t3"]
        run = objects["dry_run"]
    assert speeds["all"] < speeds["attention"] and speeds["all"] < speeds["lora"]
    # LoRA: base linears one forward in backward (input gradients), attention products and adapters two.
    macs = run.macs_t3
    weightless = macs.self_attention + macs.cross_attention
    d, f, r, tokens, text = 1536, 8960, 64, 21 * 136 * 240, 512
    adapters = (
        30 * r * (tokens * (6 * 2 * d + 2 * (d + f)) + text * 2 * 2 * d)
    )  # attn1 qkvo, attn2 qo; ffn; attn2 kv
    forward = macs.total + adapters
    backward = 2 * weightless + (macs.total - weightless) + 2 * adapters
    expected = forward + backward + forward  # + the recompute of checkpointing
    assert (
        training_macs_per_sample(macs, trainable="lora", adapter_macs=adapters, checkpointing=True)
        == expected
    )
    assert run.speed_t3["flops_per_sample"] == 2 * expected


@pytest.mark.parametrize(
    "model,schedule", [("tiny", "wan21_windows"), ("wan2.1-t2v-1.3b", "wan21_windows"), ("wan2.2-ti2v-5b", "wan22_windows")]
)  # fmt: skip
def test_training_defaults_to_the_schedule_the_model_config_names(model, schedule):
    """`train.py model=wan2.2-ti2v-5b` used to keep wan21_windows (train.yaml's default)."""
    from hydra.utils import instantiate

    from t3.attention import get_schedule

    cfg = compose_train(f"model={model}", "data.height=2176", "data.width=3840")
    assert cfg.model.default_schedule == schedule and instantiate(cfg.t3) == get_schedule(schedule)
    assert cfg.t3.name == schedule
    assert compose_train(f"model={model}", "t3=dense").t3.name == "dense"  # an explicit choice wins


def test_experiments_keep_their_schedules_over_the_models_default():
    assert compose_train("experiment=t3_4k_wan22").t3.name == "wan22_4k"
    assert compose_train("experiment=t3_4k_wan22", "t3=wan22_windows").t3.name == "wan22_windows"


WRONG_MODEL = [
    # overrides, words the one-line message must contain (naming the schedule's model and the one asked for)
    (
        ["experiment=t3_4k_wan22", "t3=wan21_4k"],
        "t3='wan21_4k' does not fit 2176x3840x81 (token grid (21, 68, 120)) on wan2.2-ti2v-5b: schedule 'wan21_4k' "
        "was made for wan2.1-t2v-1.3b (30 layers, 12 heads, patch 1x2x2, VAE stride 4x8x8), not for wan2.2-ti2v-5b "
        "(30 layers, 24 heads, patch 1x2x2, VAE stride 4x16x16)",
    ),
    (
        ["experiment=t3_720p_wan22", "t3=wan21_windows"],
        "schedule 'wan21_windows' counts its windows in tokens of 4x16x16 frames x pixels, wan2.2-ti2v-5b's "
        "tokens are 4x32x32",
    ),
    (
        ["experiment=t3_720p", "t3=wan21_4k"],
        "schedule 'wan21_4k' fixes piece counts for the token grid (21, 136, 240) only, got (21, 45, 80); on other "
        "grids use 'wan21_windows'",
    ),
    (["t3=wan21_4k"], "schedule 'wan21_4k' was made for wan2.1-t2v-1.3b (30 layers, 12 heads"),
]


@pytest.mark.parametrize("overrides,words", WRONG_MODEL, ids=[" ".join(w[0]) for w in WRONG_MODEL])
def test_a_schedule_made_for_another_model_or_grid_fails_validation(overrides, words):
    with pytest.raises(ConfigError) as info:
        validate(compose_train(*overrides, "dry_run=true"))
    assert "\n" not in str(info.value) and words in str(info.value), str(info.value)


@pytest.mark.parametrize("name", ["t3_720p", "t3_720p_wan22"])
def test_stage1_experiments_pad_no_layer(name, caplog):
    caplog.set_level("INFO", logger="t3.config.validation")
    facts = validate(compose_train(f"experiment={name}", "dry_run=true"))
    assert not any(facts.schedule.padding_report(facts.grid, facts.num_layers).padded)
    assert f"T3 schedule {facts.schedule.name} on grid {facts.grid}, 30 layers: no layer pads" in caplog.text


def test_validation_logs_the_padding_a_window_preset_makes(caplog):
    caplog.set_level("INFO", logger="t3.config.validation")
    validate(compose_train("experiment=t3_720p", "dry_run=true", "t3=wan21_windows"))
    assert (
        "T3 schedule wan21_windows on grid (21, 45, 80), 30 layers: padding 3.9% of the real tokens"
        in caplog.text
    )

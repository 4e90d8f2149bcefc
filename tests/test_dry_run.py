"""The dry run under sequence parallelism: per-GPU activations on the token shard with the SP buffers,
bytes sent per step (T3-aware and Ulysses), and a verdict whose GPU counts are multiples of the SP size."""

from __future__ import annotations

import math

import pytest

from t3.config import validate
from t3.memory import GIB, activation_memory

from .test_configs import compose_train, zero3_total

SP = "parallel.sequence_parallel_size"


def dry(*overrides: str):
    from t3.training import train

    cfg = compose_train(*overrides, "dry_run=true")
    metrics, objects = train(cfg)
    return cfg, metrics, objects["dry_run"]


@pytest.fixture(scope="module")
def t3_4k_sp8():
    """``experiment=t3_4k_sp8`` on 2 nodes x 8 GPUs: sp=8 x data parallel 2, no activation offload."""
    return dry("experiment=t3_4k_sp8", "dry_run_num_gpus=16")


def test_cost_per_rank_adds_up_to_the_group_formula():
    from t3.attention import get_schedule
    from t3.parallel.cost import peak_attention_bytes, schedule_costs

    grid, heads, head_dim = (5, 6, 8), 3, 4
    for sp in (2, 3, 4):
        costs = schedule_costs(get_schedule("wan21_windows"), grid, 5, heads, head_dim, sp)
        for c in costs:
            a = c.assignment
            # What the ranks send in the forward is the group's 4 * moved_rows * D * e.
            assert sum(c.sent_bytes(2)) == c.bytes(2) == 4 * a.moved_rows * head_dim * 2
            assert sum(a.sent_rows) == sum(a.received_rows)
            # Held by the attention: both buffers and the grouped slots, q, k, v and output each.
            sends = [s + k for s, k in zip(a.sent_rows, a.kept_rows, strict=True)]
            receives = [r + k for r, k in zip(a.received_rows, a.kept_rows, strict=True)]
            slots = [n * a.group_size for n in a.units]
            assert c.attention_bytes(2) == tuple(
                4 * head_dim * 2 * (s + r + g) for s, r, g in zip(sends, receives, slots, strict=True)
            )
        assert peak_attention_bytes(costs, 2) == max(max(c.attention_bytes(2)) for c in costs)


def test_sp_bytes_per_step_of_a_dense_run_are_ulysses_by_hand():
    """Dense attention, 12 heads over sp=2: each rank computes 6 whole heads, as Ulysses does, so each
    GPU sends a quarter of the layer's ``4 L N D e`` per pass (q, k, v of its tokens' other 6 heads, and
    the outputs back); 3 passes with checkpointing, 30 layers, 64 micro-batches; the output gather
    sends the rank's ``[L / 2, 16 x 4]`` shard once forward, once backward."""
    cfg, metrics, run = dry("experiment=t3_720p", "t3=dense", f"{SP}=2", "dry_run_num_gpus=2")
    tokens, heads, head_dim, bf16 = 21 * 45 * 80, 12, 128, 2
    accumulate = 64  # global 64 = micro 1 x data-parallel 1 x 64
    assert run.facts.accumulate == accumulate and run.facts.data_parallel_size == 1
    exchange = 3 * accumulate * 30 * 4 * tokens * heads * head_dim * bf16 / 4
    gather = 2 * accumulate * (tokens // 2) * 64 * bf16
    assert metrics["dry_run/sp_exchange_bytes_per_step_per_gpu"] == pytest.approx(exchange, rel=1e-12)
    assert metrics["dry_run/sp_ulysses_bytes_per_step_per_gpu"] == pytest.approx(exchange, rel=1e-12)
    assert metrics["dry_run/sp_bytes_per_step_per_gpu"] == pytest.approx(exchange + gather, rel=1e-12)
    assert metrics["dry_run/sequence_parallel_size"] == 2.0


def test_activations_shrink_with_the_sequence_parallel_size():
    from t3.parallel.cost import peak_attention_bytes

    found = {}
    for sp in (1, 2, 4):
        cfg, metrics, run = dry("experiment=t3_720p", f"{SP}={sp}", f"dry_run_num_gpus={sp}")
        found[sp] = run.memory.activations
        if sp == 1:
            assert run.sequence_parallel is None and metrics["dry_run/sp_bytes_per_step_per_gpu"] == 0.0
            continue
        spc = run.sequence_parallel
        assert spc.shard_tokens == math.ceil(21 * 45 * 80 / sp)
        expected = activation_memory(
            tokens=spc.shard_tokens, dim=1536, ffn_dim=8960, num_layers=30, micro_batch=1, bytes_per_value=2,
            branches=2, checkpointing=True, offload=False, attention_bytes=peak_attention_bytes(spc.costs, 2),
        )  # fmt: skip
        assert run.memory.activations == expected[0]
    # Every per-token term shrinks with the shard; the exchange buffers come on top of 1 / sp.
    assert found[1] > found[2] > found[4] > found[1] / 4


def test_t3_4k_at_sp8_fits_80_gib_without_activation_offload(t3_4k_sp8):
    from t3.training.dry_run import format_dry_run

    cfg, metrics, run = t3_4k_sp8
    f, m = run.facts, run.memory
    assert (f.world_size, f.sequence_parallel_size, f.data_parallel_size, f.accumulate) == (16, 8, 2, 32)
    assert cfg.finetune.offload_activations is False and m.activations_cpu == 0
    # ZeRO-3 shards the state over all 16 ranks; the activations are one rank's shard of 85,680 tokens.
    assert run.sequence_parallel.shard_tokens == 685_440 // 8
    assert m.gpu_total == pytest.approx(zero3_total(run, 16))
    assert metrics["dry_run/fits"] == 1.0 and m.gpu_total < 80 * GIB
    assert metrics["dry_run/gpu_margin_gib"] == pytest.approx(80 - m.gpu_total / GIB)
    text = format_dry_run(cfg, run)
    assert "batch: global 64 = micro 1 x data-parallel 2 x accumulate 32 (16 GPUs" in text
    assert "85,680 of 685,440 tokens per GPU" in text
    assert "T3-aware q/k/v exchange" in text and "Ulysses all-to-all by heads" in text
    assert "no sequence-parallel setting" not in text
    # The exchange stays within 2x of what Ulysses would send (the bound, per layer and per step).
    comm = run.sequence_parallel.communication
    assert 0 < comm.exchange <= 2 * comm.ulysses
    assert metrics["dry_run/sp_bytes_per_step_per_gpu"] == comm.exchange + comm.gather


def test_without_sp_t3_4k_needs_offload_and_the_verdict_suggests_an_sp(t3_4k_sp8):
    cfg, metrics, run = dry("experiment=t3_4k", "finetune.offload_activations=false", "dry_run_num_gpus=16")
    assert metrics["dry_run/fits"] == 0.0 and math.isnan(metrics["dry_run/fewest_gpus"])
    v = run.verdict
    assert v.suggested_sp is not None and v.suggested_sp <= 8
    assert metrics["dry_run/suggested_sequence_parallel_size"] == v.suggested_sp
    # The suggestion is the smallest SP size whose activations leave room for the state somewhere.
    _, _, smaller = dry(
        "experiment=t3_4k_sp8", f"{SP}={v.suggested_sp}", f"dry_run_num_gpus={v.suggested_sp}"
    )
    assert smaller.memory.activations == v.suggested_activations


def test_fewest_gpus_are_multiples_of_the_sp_size(t3_4k_sp8):
    _, _, at_16 = t3_4k_sp8

    def total(n: int) -> float:
        return zero3_total(at_16, n)

    # A GPU just too small for 8 or 16 GPUs: the state must be sharded further, over 8 x 4.
    budget = (total(16) + total(32)) / 2 / GIB
    cfg, metrics, run = dry("experiment=t3_4k_sp8", "dry_run_num_gpus=16", f"dry_run_gpu_memory_gib={budget}")
    worlds = [8 * d for d in (1, 2, 4, 8, 16, 32, 64)]
    expected = next(n for n in worlds if total(n) <= budget * GIB)
    assert expected == 32 and metrics["dry_run/fewest_gpus"] == 32
    assert metrics["dry_run/fits"] == 0.0


def test_sp_that_does_not_tile_the_world_fails_before_the_dry_run():
    from t3.config import ConfigError

    with pytest.raises(ConfigError, match=SP.replace(".", r"\.")):
        validate(compose_train("experiment=t3_4k_sp8", "dry_run=true", "dry_run_num_gpus=12"))


# --- the README's "One video on many GPUs" shows what the dry run and the benchmark print --------------------


def _readme_section() -> str:
    from .conftest import REPO_ROOT

    text = (REPO_ROOT / "README.md").read_text()
    return text[text.index("## One video on many GPUs") : text.index("## Efficiency")]


def test_readme_dry_run_output_is_what_the_dry_run_prints(t3_4k_sp8):
    from t3.training.dry_run import format_dry_run

    cfg, _, run = t3_4k_sp8
    printed = format_dry_run(cfg, run).splitlines()
    section = _readme_section()
    block = section.split("```text\n", 1)[1].split("```", 1)[0]
    assert block.strip() and all(line in printed for line in block.splitlines() if line.strip())


def test_readme_sp_table_is_what_the_dry_run_estimates(t3_4k_sp8):
    rows = [
        line for line in _readme_section().splitlines() if line.startswith("| 1 ") or line.startswith("| 8 ")
    ]
    assert len(rows) == 4
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        sp, offload = int(cells[0].split()[0]), cells[1] == "true"
        if (sp, offload) == (8, False):
            _, metrics, _ = t3_4k_sp8
        else:
            _, metrics, _ = dry(
                "experiment=t3_4k",
                f"{SP}={sp}",
                f"finetune.offload_activations={offload}",
                "dry_run_num_gpus=16",
            )
        assert cells[2].split()[0] == f"{metrics['dry_run/activations_gib_per_gpu']:.2f}", row
        assert cells[3] == f"{metrics['dry_run/total_gib_per_gpu']:.2f}", row
        assert cells[4].startswith("fits" if metrics["dry_run/fits"] else "does not fit"), row


def test_readme_benchmark_rows_are_rows_of_the_results_file():
    from .conftest import REPO_ROOT

    results = (REPO_ROOT / "benchmarks" / "results" / "sequence_parallel.md").read_text().splitlines()
    rows = [
        line for line in _readme_section().splitlines() if line.count("|") == 12 and "SP attention)" in line
    ]
    assert len(rows) == 6
    for row in rows:
        assert "| " + row.split("| ", 2)[2] in results, row

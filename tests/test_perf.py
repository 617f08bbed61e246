"""`moe-bench perf` benchmarks at toy sizes: they run, agree with themselves and print their tables.

The figures themselves are for the benchmark runs quoted in the issues/README, not asserted here
(timings on shared CPUs drift)."""
from __future__ import annotations

import pytest
import torch

from bench.perf import (decoding_benchmark, evaluation_benchmark, format_decoding_table, format_evaluation_table,
                        format_layer_table, format_training_table, layer_benchmark, training_benchmark)


def test_decoding_benchmark_compares_cached_and_full_prefix_decoding():
    result = decoding_benchmark(batch=4, src_len=5, max_len=6, vocab=50, beam_size=2)
    assert [(r["family"], r["search"], r["sentences"]) for r in result["rows"]] == [
        ("dense", "greedy", 4), ("dense", "beam 2", 2), ("switch", "greedy", 4), ("switch", "beam 2", 2)]
    for r in result["rows"]:
        # Exact relations within one measurement (no comparison of rounded rates: timing-proof).
        cached, full = r["cached_seconds"], r["full_prefix_seconds"]
        assert cached > 0 and full > 0
        assert r["speedup"] == round(full / cached, 2)
        assert r["cached_sentences_per_sec"] == round(r["sentences"] / cached, 1)
        assert r["full_prefix_sentences_per_sec"] == round(r["sentences"] / full, 1)
    table = format_decoding_table(result)
    assert "6 tokens per sentence" in table and "switch  beam 2" in table


def test_layer_benchmark_rows_and_table():
    result = layer_benchmark(tokens_list=(64,), experts_list=(2,), repeats=1, with_peer=False)
    impls = {r["impl"] for r in result["rows"]}
    assert "dense" in impls and len(result["rows"]) >= 2
    assert all(r["ms"] > 0 for r in result["rows"])
    assert impls == {"dense", "ours", "ours-sorted", "ours-padded", "matmul floor", "in-cache floor"}
    ms = {r["impl"]: r["ms"] for r in result["rows"]}
    (bound,) = result["bounds"]
    # no-overlap bound = in-cache floor + memory floor (each rounded to 0.1 ms in the record)
    assert bound["no_overlap_bound_ms"] == pytest.approx(ms["in-cache floor"] + bound["memory_floor_ms"], abs=0.15)
    table = format_layer_table(result)
    assert "MoE layer forward+backward" in table and "no-overlap" in table and "in-cache floor" in table
    with pytest.raises(ValueError, match="must be multiples of 256 \\(or leave the peer out: --no-peer\\)"):
        layer_benchmark(tokens_list=(64,), experts_list=(2,), repeats=1, with_peer=True)


def test_training_benchmark_rows_and_ratios():
    torch.manual_seed(0)
    result = training_benchmark(steps=1, warmup=1, batch=2, seq=16)
    rows = {(r["precision"], r["impl"], r["family"]): r for r in result["rows"]}
    assert set(rows) == {(p, i, f) for p in ("fp32", "bf16")
                         for i, f in (("plain loop", "dense"), ("moe-bench", "dense"), ("moe-bench", "switch"))}
    for p in ("fp32", "bf16"):
        assert rows[(p, "plain loop", "dense")]["vs_plain_dense"] == 1.0
        assert rows[(p, "moe-bench", "dense")]["vs_moe_bench_dense"] == 1.0
    assert "LM training throughput" in format_training_table(result)


def test_matmul_floor_step_does_not_accumulate_gradients():
    """Each timed step must start from fresh gradients, as a training step does."""
    from bench.models.config import MoEConfig
    from bench.models.moe import MoELayer
    from bench.perf import _matmul_floor_step

    torch.manual_seed(0)
    layer = MoELayer(8, 16, MoEConfig(num_experts=2))
    x = torch.randn(6, 8, requires_grad=True)
    step, weights = _matmul_floor_step(layer, x, [3, 3])
    step()
    first = [w.grad.clone() for w in weights]
    step()
    for w, g in zip(weights, first):
        torch.testing.assert_close(w.grad, g)  # not 2 * g


def test_evaluation_benchmark_measures_both_losses_in_their_own_processes():
    result = evaluation_benchmark(vocab=3000, batch=4, seq=32, batches=2, train_batch=2, train_steps=1, d_model=16,
                                  n_layers=1)
    assert [(r["mode"], r["impl"], r["batch"], r["batches"]) for r in result["rows"]] == [
        ("evaluation", "full logits", 4, 2), ("evaluation", "chunked", 4, 2),
        ("training", "full logits", 2, 1), ("training", "chunked", 2, 1)]
    assert result["chunk_rows"] == 2**28 // (4 * 3000)  # 22369: every batch here is one chunk
    for full, chunked in (result["rows"][:2], result["rows"][2:]):
        # the same model, data and loss in two processes (the benchmark itself checks rtol 1e-4)
        assert chunked["loss"] == pytest.approx(full["loss"], rel=1e-6)
        assert full["logits_mib"] == chunked["logits_mib"] == round(full["batch"] * 32 * 3000 * 4 / 2**20)
        assert chunked["vs_full_seconds"] == round(chunked["seconds"] / full["seconds"], 2)  # exact, one measurement
        assert full["peak_rss_mib"] > 0 and full["rise_mib"] >= 0
    table = format_evaluation_table(result)
    assert "3,000-token vocabulary" in table and "chunks of 22369 rows" in table and "training   chunked" in table

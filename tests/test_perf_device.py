"""`moe-bench perf --device`: the accelerator benchmark, run at toy sizes on the CPU (and on CUDA
when the machine has it): rows, MFU arithmetic, peaks, the synthetic corpus and the CLI's errors."""
from __future__ import annotations

import json

import pytest
import torch

from bench.cli import main
from bench.flops import model_cost
from bench.models import model_config
from bench.perf_device import (device_layer_benchmark, device_training_benchmark, format_device_layer_table,
                               format_device_training_table, kernels_on, spec_peak_tflops, zipf_bigram_batches)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TOY = {"d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 64}


@pytest.mark.parametrize("device", DEVICES)
def test_layer_rows_cover_dense_every_kernel_and_dropless(device):
    result = device_layer_benchmark(device, "tiny", tokens_list=(128,), experts_list=(4,), precision="bf16",
                                    repeats=1)
    impls = [r["impl"] for r in result["rows"]]
    assert impls == ["dense", "auto", "auto dropless"] + kernels_on(torch.device(device))
    rows = {r["impl"]: r for r in result["rows"]}
    assert rows["dense"]["vs_dense"] == 1.0 and rows["dense"]["kernel"] is None
    assert rows["auto dropless"]["fraction_dropped"] == 0.0
    assert all(rows[k]["kernel"] == k for k in kernels_on(torch.device(device)))
    for r in result["rows"]:
        assert r["ms"] > 0 and r["vs_dense"] == round(r["ms"] / rows["dense"]["ms"], 2)
    assert (result["d_model"], result["d_ff"]) == (256, 1024)
    table = format_device_layer_table(result)
    assert "preset tiny (d_model 256, d_ff 1024)" in table and "auto dropless" in table


@pytest.mark.parametrize("device", DEVICES)
def test_training_rows_give_tokens_per_second_and_mfu_from_the_flop_count(device):
    result = device_training_benchmark(device, presets=("tiny",), batch=2, seq=16, vocab=97, steps=2, warmup=1,
                                       precision="fp32", peak_tflops=0.5, overrides=TOY)
    assert [(r["family"], r["impl"]) for r in result["rows"]] == [
        ("dense", "moe-bench"), ("dense", "plain loop"), ("switch", "moe-bench"), ("switch", "plain loop")]
    for r in result["rows"]:
        over = dict(TOY, **({"capacity_factor": None} if r["family"] == "switch" else {}))
        cost = model_cost(model_config(r["family"], "tiny", over, vocab_size=97, max_seq_len=16), 16)
        per_token = cost.train_flops_per_token / 1e12  # tokens_per_sec is rounded to a whole token: +-0.5 of it
        assert r["model_tflops"] == pytest.approx(r["tokens_per_sec"] * per_token, rel=1e-6, abs=0.5 * per_token)
        assert r["mfu_spec"] == round(r["model_tflops"] / 0.5, 4)
        assert r["mfu_measured"] == round(r["model_tflops"] / result["matmul_tflops"], 4)
        assert r["active_params"] == cost.active_params
    switch = [r for r in result["rows"] if r["family"] == "switch"]
    assert all(r["max_over_mean_load"] >= 1.0 for r in switch)  # the busiest expert holds at least the mean
    assert all(r["max_over_mean_load"] is None for r in result["rows"] if r["family"] == "dense")
    table = format_device_training_table(result)
    assert "0.5 TFLOP/s data-sheet peak" in table and "plain loop" in table


def test_spec_peaks_match_the_device_name(monkeypatch):
    cuda = torch.device("cuda")
    for name, bf16 in (("NVIDIA H200", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 80GB HBM3", 989.4),
                       ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L4", 121.0), ("Some Future GPU", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_a, name=name: name)
        assert spec_peak_tflops(cuda, "bf16") == bf16, name
    assert spec_peak_tflops(torch.device("cpu"), "bf16") is None


def test_synthetic_corpus_is_a_zipf_like_bigram_chain():
    batches = zipf_bigram_batches(vocab=50, batch=4, seq=64, n=3, seed=1)
    again = zipf_bigram_batches(vocab=50, batch=4, seq=64, n=3, seed=1)
    assert len(batches) == 3 and all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    x, y = batches[0]
    assert x.shape == y.shape == (4, 64)
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    every = torch.cat([torch.cat([x, y[:, -1:]], 1) for x, y in batches])
    successors = {}
    for row in every.tolist():
        for a, b in zip(row, row[1:]):
            successors.setdefault(a, set()).add(b)
    assert max(len(s) for s in successors.values()) <= 32  # each token has at most 32 successors
    counts = torch.bincount(every.flatten(), minlength=50)
    assert counts[:5].sum() > counts[-25:].sum()  # low ids (high Zipf rate) dominate


def test_cli_runs_the_device_layer_benchmark_and_refuses_what_it_cannot_do(capsys):
    assert main(["perf", "--device", "cpu", "--only", "layer", "--layer-preset", "tiny", "--tokens", "64",
                 "--experts", "2", "--repeats", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {r["impl"] for r in out["layer"]["rows"]} >= {"dense", "auto", "sorted", "padded"}
    assert main(["perf", "--device", "cpu", "--only", "decoding"]) == 2
    assert "--device runs the layer and training parts only" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["perf", "--device", "cuda"]) == 2
        assert "sees no CUDA device" in capsys.readouterr().err
